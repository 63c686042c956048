"""API routes: POST /trust/v1/unlearn (queue-locked like txt2img; progress and interrupt through /sdapi/v1/progress
and /sdapi/v1/interrupt) and GET /trust/v1/deltas."""

from __future__ import annotations

import dataclasses

from . import host, run


def request_model():
    """A pydantic model of run.Request (pydantic 1 in AUTOMATIC1111 v1.8, 2 in newer stacks)."""
    import pydantic

    fields = {}
    for f in dataclasses.fields(run.Request):
        default = f.default if f.default is not dataclasses.MISSING else ...
        kind = type(f.default) if f.default is not dataclasses.MISSING else str
        fields[f.name] = (kind, default)
    return pydantic.create_model("TrustUnlearnRequest", **fields)


def mount(demo, app) -> None:
    from fastapi import HTTPException
    from modules import call_queue, shared

    Body = request_model()

    def unlearn(body: Body):  # a plain def: FastAPI runs it in a thread, so progress/interrupt stay answerable
        values = body.dict() if hasattr(body, "dict") else body.model_dump()
        with call_queue.queue_lock:
            shared.state.begin(job="trust_unlearn")
            try:
                out = run.unlearn(run.Request(**values))
            except host.Interrupted as e:
                raise HTTPException(status_code=409, detail=str(e)) from None
            except ValueError as e:  # bad inputs, a model TRuST cannot train (HostModelError), concept errors
                raise HTTPException(status_code=422, detail=str(e)) from None
            finally:
                shared.state.end()
        return {k: v for k, v in out.items()}

    unlearn.__annotations__["body"] = Body  # a real class, not the string `from __future__ import annotations` makes

    def deltas():
        return {"deltas": run.list_deltas(shared)}

    app.add_api_route("/trust/v1/unlearn", unlearn, methods=["POST"])
    app.add_api_route("/trust/v1/deltas", deltas, methods=["GET"])
