"""The recipes that combine the science (docs/ARCHITECTURE.md, layers): segment-and-export
(:mod:`.segment`), the trace pipeline (:mod:`.traces`), the studies (:mod:`.validate_patterns`,
:mod:`.domain_gap`, :mod:`.real_eval`). The CLI and the service runners call these; the
science below (``io``, ``analysis``, ``simulate``, ``segment``) never imports them.
"""
