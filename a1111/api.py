"""API routes: POST /trust/v1/unlearn, /trust/v1/bake, /trust/v1/verify and /trust/v1/saliency (queue-locked like
txt2img; progress and interrupt through /sdapi/v1/progress and /sdapi/v1/interrupt) and GET /trust/v1/deltas."""

from __future__ import annotations

import dataclasses

from . import bake, host, run, saliency, verify


def request_model(request_class=run.Request, name: str = "TrustUnlearnRequest"):
    """A pydantic model of a request dataclass (pydantic 1 in AUTOMATIC1111 v1.8, 2 in newer stacks)."""
    import pydantic

    fields = {}
    for f in dataclasses.fields(request_class):
        default = f.default if f.default is not dataclasses.MISSING else ...
        kind = type(f.default) if f.default is not dataclasses.MISSING else str
        fields[f.name] = (kind, default)
    return pydantic.create_model(name, **fields)


def locked(job_name: str, work):
    """Run work() holding the web UI's queue lock with shared.state begun/ended, as /sdapi/v1/txt2img does; the
    engine's errors as HTTP answers (422 bad input or a model that does not fit, 409 interrupted)."""
    from fastapi import HTTPException
    from modules import call_queue, shared

    with call_queue.queue_lock:
        shared.state.begin(job=job_name)
        try:
            return work()
        except host.Interrupted as e:
            raise HTTPException(status_code=409, detail=str(e)) from None
        except ValueError as e:  # bad inputs, a model TRuST cannot use (HostModelError), another base model
            raise HTTPException(status_code=422, detail=str(e)) from None
        finally:
            shared.state.end()


def values(body) -> dict:
    return body.dict() if hasattr(body, "dict") else body.model_dump()


def mount(demo, app) -> None:
    from modules import shared

    Body = request_model()
    BakeBody = request_model(bake.BakeRequest, "TrustBakeRequest")
    VerifyBody = request_model(verify.VerifyRequest, "TrustVerifyRequest")
    SaliencyBody = request_model(saliency.SaliencyRequest, "TrustSaliencyRequest")

    def unlearn(body: Body):  # a plain def: FastAPI runs it in a thread, so progress/interrupt stay answerable
        return locked("trust_unlearn", lambda: run.unlearn(run.Request(**values(body))))

    def bake_route(body: BakeBody):
        return locked("trust_bake", lambda: bake.bake(bake.BakeRequest(**values(body))))

    def verify_route(body: VerifyBody):  # the report and pass / fail as JSON (the worst cases' prompts, no images)
        def work():
            out = verify.verify(verify.VerifyRequest(**values(body)))
            return {"report": out["report"], "passed": out["passed"], "result": out["json"]}

        return locked("trust_verify", work)

    def saliency_route(body: SaliencyBody):  # the summary and the concept neurons per site (no heatmap image)
        def work():
            out = saliency.find(saliency.SaliencyRequest(**values(body)))
            return {"summary": out["summary"], "mode": out["mode"], "neurons": out["neurons"]}

        return locked("trust_saliency", work)

    # real classes, not the strings `from __future__ import annotations` makes
    unlearn.__annotations__["body"] = Body
    bake_route.__annotations__["body"] = BakeBody
    verify_route.__annotations__["body"] = VerifyBody
    saliency_route.__annotations__["body"] = SaliencyBody

    def deltas():
        return {"deltas": run.list_deltas(shared)}

    app.add_api_route("/trust/v1/unlearn", unlearn, methods=["POST"])
    app.add_api_route("/trust/v1/bake", bake_route, methods=["POST"])
    app.add_api_route("/trust/v1/verify", verify_route, methods=["POST"])
    app.add_api_route("/trust/v1/saliency", saliency_route, methods=["POST"])
    app.add_api_route("/trust/v1/deltas", deltas, methods=["GET"])
