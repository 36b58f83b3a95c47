"""The interactive explorer (`concepthash-explore`): engine (no web) and app (Starlette).

Needs the [explore] extra (starlette, uvicorn) for `app`; `engine` needs only
the core dependencies.
"""
