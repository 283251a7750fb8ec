"""The API's routes by resource (one router each; :mod:`api.main` includes them in order)."""
