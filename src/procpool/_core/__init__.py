"""procpool's engine: worker processes, the wire protocol, and the dispatcher.

Nothing here imports from the API modules above it; see ``_dispatcher`` for the
data-flow diagram.
"""
