"""The predictor's HTTP servers (aiohttp), API-compatible with the llm-d latency predictor sidecars.

Training server (reference port 8000):
    POST /add_training_data_bulk   {"entries": [TrainingEntry, ...]} → 202 {"message": "Accepted N training samples."}
    GET  /model/{ttft|tpot}/info   {"name", "exists", "last_modified", "samples", "source"}
    GET  /model/{ttft|tpot}/download   the coefficients as JSON (a prediction-only server syncs them;
                                       the reference ships joblib files here)
    GET  /models/list, GET /data/status, POST /flush (forget samples, back to the prior), GET /metrics
Prediction server (reference port 8001):
    POST /predict                  PredictionRequest → {"ttft_ms", "tpot_ms", "predicted_at", "model_type",
                                                        "objective_type", "quantile", "last_model_load"}
    POST /predict/bulk/strict      {"requests": [...]} (1..10000) → {"predictions": [...], "total_requests",
                                   "successful_predictions", "failed_predictions", "processing_time_ms"};
                                   any invalid row fails the whole call (422)
    POST /predict/bulk             the same, invalid rows reported in "errors" [{"index", "error", "request"}]
    GET  /status, POST /reload (prediction-only: sync the model now)
Both: GET /healthz → {"status": "ok"}, GET /readyz → {"status": "ready"} (ready from the start: the
prior predicts until samples arrive).

Bad input never crashes a server: a body that is not JSON is answered 400, a field of the wrong type or
out of bounds 422, both as {"detail": "<what, with the field's path>"}; an unexpected error is a 500
with a JSON body and a log line.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec
from aiohttp import web

from llmepp.latencypredictor import schema
from llmepp.latencypredictor.model import MAX_FEATURE, LatencyModel, TargetModel, iso
from llmepp.observability.logging import quiet_malformed_http_requests
from llmepp.tasks import cancel_and_wait

log = logging.getLogger(__name__)

MODEL_TYPE = "bayesian_ridge"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Settings:
    """Defaults follow the reference's environment variables (`from_env`)."""

    mode: str = "both"  # both | training | prediction
    host: str = "127.0.0.1"
    training_port: int = 8000
    prediction_port: int = 8001
    retraining_interval: float = 10.0  # LATENCY_RETRAINING_INTERVAL_SEC
    min_samples: int = 10  # LATENCY_MIN_SAMPLES_FOR_RETRAIN: a target is fitted once it stores this many
    max_per_bucket: int = 500  # LATENCY_MAX_TRAINING_DATA_SIZE_PER_BUCKET
    quantile: float = 0.9  # LATENCY_QUANTILE_ALPHA
    objective: str = "quantile"  # LATENCY_OBJECTIVE_TYPE: quantile | mean
    prior_strength: float = 1.0  # LATENCY_PRIOR_STRENGTH (λ: the prior counts like ~λ samples)
    training_server_url: str = "http://localhost:8000"  # TRAINING_SERVER_URL (prediction-only mode)
    model_sync_interval: float = 10.0  # MODEL_SYNC_INTERVAL_SEC
    max_body_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.mode not in ("both", "training", "prediction"):
            raise ValueError(f"mode must be both, training or prediction, got {self.mode!r}")
        if not 0 <= self.training_port <= 65535 or not 0 <= self.prediction_port <= 65535:
            raise ValueError(f"ports must be in 0..65535, got {self.training_port} and {self.prediction_port}")
        if not 0 < self.retraining_interval < math.inf or not 0 < self.model_sync_interval < math.inf:
            raise ValueError("intervals must be finite numbers > 0")
        if self.min_samples < 1 or self.max_per_bucket < 1:
            raise ValueError("min samples and max samples per bucket must be >= 1")
        if not 0.0 < self.quantile < 1.0:
            raise ValueError(f"quantile must be in (0, 1), got {self.quantile}")
        if self.objective not in ("quantile", "mean"):
            raise ValueError(f"objective must be quantile or mean, got {self.objective!r}")
        if not 0.0 < self.prior_strength < math.inf:
            raise ValueError(f"prior strength must be a finite number > 0, got {self.prior_strength}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for key, name, kind in (
            ("retraining_interval", "LATENCY_RETRAINING_INTERVAL_SEC", float),
            ("min_samples", "LATENCY_MIN_SAMPLES_FOR_RETRAIN", int),
            ("max_per_bucket", "LATENCY_MAX_TRAINING_DATA_SIZE_PER_BUCKET", int),
            ("quantile", "LATENCY_QUANTILE_ALPHA", float),
            ("objective", "LATENCY_OBJECTIVE_TYPE", str),
            ("prior_strength", "LATENCY_PRIOR_STRENGTH", float),
            ("training_server_url", "TRAINING_SERVER_URL", str),
            ("model_sync_interval", "MODEL_SYNC_INTERVAL_SEC", float),
            ("host", "PREDICT_HOST", str),
            ("prediction_port", "PREDICT_PORT", int),
        ):
            if env.get(name):
                try:
                    values[key] = kind(env[name])
                except ValueError:
                    raise ValueError(f"{name}: cannot read {env[name]!r} as {kind.__name__}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


class PredictorService:
    """The model plus its HTTP servers and background loops (retraining; model sync when prediction-only)."""

    def __init__(self, settings: Settings | None = None, model: LatencyModel | None = None) -> None:
        self.settings = s = settings or Settings()
        self.model = model or LatencyModel(
            max_per_bucket=s.max_per_bucket, quantile=s.quantile, objective=s.objective, prior_strength=s.prior_strength
        )
        self.started_at = time.time()
        self.last_model_load: float | None = None
        self.predictions = 0
        self.rejected = 0
        self.urls: dict[str, str] = {}  # role → base URL once started
        self._runners: list[web.AppRunner] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._client: aiohttp.ClientSession | None = None
        self._synced: dict[str, str] = {}  # target → trained_at of the last synced model

    # -- lifecycle ---------------------------------------------------------------------------------
    def app(self, *, training: bool, prediction: bool) -> web.Application:
        app = web.Application(middlewares=[_json_errors], client_max_size=self.settings.max_body_bytes)
        r = app.router
        r.add_get("/healthz", self.healthz)
        r.add_get("/readyz", self.readyz)
        if training:
            r.add_post("/add_training_data_bulk", self.add_training_data_bulk)
            r.add_get("/model/{name}/info", self.model_info)
            r.add_get("/model/{name}/download", self.model_download)
            r.add_get("/models/list", self.models_list)
            r.add_get("/data/status", self.data_status)
            r.add_post("/flush", self.flush)
            r.add_get("/metrics", self.metrics)
        if prediction:
            r.add_post("/predict", self.predict)
            r.add_post("/predict/bulk/strict", self.predict_bulk_strict)
            r.add_post("/predict/bulk", self.predict_bulk)
            r.add_get("/status", self.status)
            r.add_post("/reload", self.reload)
        return app

    async def start(self) -> dict[str, str]:
        """Bind the servers of the configured mode; returns {"training": url, "prediction": url}."""
        s = self.settings
        both = s.mode == "both"
        plan: list[tuple[str, int, bool, bool]] = []
        if s.mode in ("both", "training"):
            plan.append(("training", s.training_port, True, both))
        if s.mode in ("both", "prediction"):
            plan.append(("prediction", s.prediction_port, both, True))
        if both and s.training_port and s.training_port == s.prediction_port:
            plan = [("training", s.training_port, True, True)]
        quiet_malformed_http_requests()
        for role, port, training, prediction in plan:
            runner = web.AppRunner(self.app(training=training, prediction=prediction), access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, s.host, port)
            await site.start()
            self._runners.append(runner)
            host, bound = runner.addresses[0][:2]
            self.urls[role] = f"http://{host}:{bound}"
        if "prediction" not in self.urls and both:
            self.urls["prediction"] = self.urls["training"]
        if s.mode != "prediction":
            self._tasks.append(asyncio.create_task(self._retrain_loop()))
        else:
            self._tasks.append(asyncio.create_task(self._sync_loop()))
        return dict(self.urls)

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        await cancel_and_wait(*tasks)
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def __aenter__(self) -> PredictorService:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _retrain_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.retraining_interval)
            try:
                self.retrain()
            except Exception:
                log.exception("retraining failed; the previous model keeps predicting")

    def retrain(self) -> list[str]:
        """Refit the targets that have new samples (the loop calls this every retraining interval)."""
        done = self.model.retrain(self.settings.min_samples)
        if done:
            self.last_model_load = time.time()
            for name in done:
                t = self.model.target(name)
                assert t is not None
                c = t.coefficients
                log.info("%s model refitted on %d samples (p%.0f residual %+.1f ms)", name, c.samples,
                         self.model.quantile * 100, c.residual_quantile)  # fmt: skip
        return done

    async def _sync_loop(self) -> None:
        while True:
            try:
                await self.sync()
            except Exception as e:  # the training server may be down or restarting: keep the last model
                log.warning("model sync from %s failed: %s", self.settings.training_server_url, e)
            await asyncio.sleep(self.settings.model_sync_interval)

    async def sync(self) -> bool:
        """Fetch newer coefficients from the training server; True if any were loaded."""
        if self._client is None:
            self._client = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        base = self.settings.training_server_url.rstrip("/")
        updated = False
        for t in self.model.targets:
            async with self._client.get(f"{base}/model/{t.spec.name}/download") as resp:
                if resp.status != 200:
                    continue
                doc = await resp.json()
            if doc.get("source") == "prior" or doc.get("trained_at") == self._synced.get(t.spec.name):
                continue
            t.load_json(doc)
            self._synced[t.spec.name] = doc.get("trained_at", "")
            updated = True
        if updated:
            self.last_model_load = time.time()
        return updated

    # -- handlers: common --------------------------------------------------------------------------
    async def healthz(self, request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        return _json({"status": "ready"})

    # -- handlers: training ------------------------------------------------------------------------
    async def add_training_data_bulk(self, request: web.Request) -> web.Response:
        batch = await _decode(request, schema.BulkTrainingRequest)
        assert isinstance(batch, schema.BulkTrainingRequest)
        before = sum(t.skipped for t in self.model.targets)
        n = self.model.add(batch.entries)
        message = f"Accepted {n} training samples."
        skipped = sum(t.skipped for t in self.model.targets) - before
        if skipped:
            message += f" Skipped {skipped} TTFT/TPOT samples with a feature beyond the model's range."
            log.warning("skipped %d training samples with a feature beyond the model's range (scaled > %g)",
                        skipped, MAX_FEATURE)  # fmt: skip
        return _json({"message": message}, status=202)

    def _target(self, request: web.Request) -> TargetModel:
        t = self.model.target(request.match_info["name"])
        if t is None:
            raise ApiError(404, f"unknown model {request.match_info['name']!r} (ttft, tpot)")
        return t

    async def model_info(self, request: web.Request) -> web.Response:
        t = self._target(request)
        c = t.coefficients
        return _json({"name": t.spec.name, "exists": True, "last_modified": iso(c.trained_at), "samples": c.samples,
                      "source": c.source, "model_type": MODEL_TYPE})  # fmt: skip

    async def model_download(self, request: web.Request) -> web.Response:
        return _json(self._target(request).to_json())

    async def models_list(self, request: web.Request) -> web.Response:
        return _json({"models": {t.spec.name: t.to_json() for t in self.model.targets}, "model_type": MODEL_TYPE})

    async def data_status(self, request: web.Request) -> web.Response:
        return _json({t.spec.name: {"received": t.received, "stored": t.stored, "since_fit": t.since_fit,
                                    "fits": t.fits, "skipped": t.skipped} for t in self.model.targets})  # fmt: skip

    async def flush(self, request: web.Request) -> web.Response:
        self.model.clear()
        return _json({"message": "Flushed all training data; predictions use the prior."})

    async def metrics(self, request: web.Request) -> web.Response:
        lines = []
        for t in self.model.targets:
            name, c = t.spec.name, t.coefficients
            lines.append(f'latency_predictor_training_samples_received_total{{target="{name}"}} {t.received}')
            lines.append(f'latency_predictor_training_samples_stored{{target="{name}"}} {t.stored}')
            lines.append(f'latency_predictor_training_samples_skipped_total{{target="{name}"}} {t.skipped}')
            lines.append(f'latency_predictor_model_fits_total{{target="{name}"}} {t.fits}')
            lines.append(f'latency_predictor_residual_quantile_ms{{target="{name}"}} {c.residual_quantile}')
            for feature, w in zip(t.spec.features, c.weights):
                lines.append(f'latency_predictor_model_coefficient{{target="{name}",feature="{feature}"}} {w}')
        lines.append(f"latency_predictor_predictions_total {self.predictions}")
        lines.append(f"latency_predictor_rejected_requests_total {self.rejected}")
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    # -- handlers: prediction ----------------------------------------------------------------------
    def _prediction(self, ttft: float, tpot: float, now: str, loaded: str | None) -> dict[str, Any]:
        return {"ttft_ms": ttft, "tpot_ms": tpot, "predicted_at": now, "model_type": MODEL_TYPE,
                "objective_type": self.model.objective, "quantile": self.model.quantile,
                "last_model_load": loaded}  # fmt: skip

    def _loaded(self) -> str | None:
        return iso(self.last_model_load) if self.last_model_load is not None else None

    async def predict(self, request: web.Request) -> web.Response:
        row = await _decode(request, schema.PredictionRequest)
        ((ttft, tpot),) = self.model.predict([row])  # type: ignore[list-item]
        self.predictions += 1
        return _json(self._prediction(ttft, tpot, iso(time.time()), self._loaded()))

    async def predict_bulk_strict(self, request: web.Request) -> web.Response:
        t0 = time.perf_counter()
        bulk = await _decode(request, schema.BulkPredictionRequest)
        assert isinstance(bulk, schema.BulkPredictionRequest)
        results = self.model.predict(bulk.requests)
        self.predictions += len(results)
        now, loaded = iso(time.time()), self._loaded()
        return _json({
            "predictions": [self._prediction(a, b, now, loaded) for a, b in results],
            "total_requests": len(results), "successful_predictions": len(results), "failed_predictions": 0,
            "processing_time_ms": (time.perf_counter() - t0) * 1000,
        })  # fmt: skip

    async def predict_bulk(self, request: web.Request) -> web.Response:
        t0 = time.perf_counter()
        body = await _decode(request, _RawBulk)
        assert isinstance(body, _RawBulk)
        rows: list[schema.PredictionRequest] = []
        where: list[int] = []
        errors: list[dict[str, Any]] = []
        for i, item in enumerate(body.requests):
            try:
                rows.append(msgspec.convert(item, schema.PredictionRequest, strict=False))
                where.append(i)
            except msgspec.ValidationError as e:
                errors.append({"index": i, "error": str(e), "request": item})
        predictions: list[dict[str, Any] | None] = [None] * len(body.requests)
        now, loaded = iso(time.time()), self._loaded()
        for i, (a, b) in zip(where, self.model.predict(rows)):
            predictions[i] = self._prediction(a, b, now, loaded)
        self.predictions += len(rows)
        return _json({
            "predictions": predictions, "errors": errors, "total_requests": len(body.requests),
            "successful_predictions": len(rows), "failed_predictions": len(errors),
            "processing_time_ms": (time.perf_counter() - t0) * 1000,
        })  # fmt: skip

    async def status(self, request: web.Request) -> web.Response:
        return _json({
            "is_ready": True, "model_type": MODEL_TYPE, "objective_type": self.model.objective,
            "quantile": self.model.quantile, "last_model_load": self._loaded(),
            "training_server_url": self.settings.training_server_url if self.settings.mode == "prediction" else "",
            "models_exist": {t.spec.name: t.coefficients.source != "prior" for t in self.model.targets},
            "ensemble_active": False,
        })  # fmt: skip

    async def reload(self, request: web.Request) -> web.Response:
        synced = False
        if self.settings.mode == "prediction":
            try:
                synced = await self.sync()
            except Exception as e:
                raise ApiError(503, f"model sync failed: {e}") from None
        return _json({"synced": synced, "loaded": True, "is_ready": True, "last_load_time": self._loaded()})


class _RawBulk(msgspec.Struct):
    requests: list[Any]

    def __post_init__(self) -> None:
        if not 1 <= len(self.requests) <= 10000:
            raise ValueError("requests must hold 1 to 10000 items")


async def _decode(request: web.Request, kind: type[msgspec.Struct]) -> msgspec.Struct:
    body = await request.read()
    try:
        return schema.decode(body, kind)
    except msgspec.ValidationError as e:
        raise ApiError(422, str(e)) from None
    except msgspec.DecodeError as e:
        raise ApiError(400, f"body is not valid JSON: {e}") from None


class ApiError(Exception):
    """An answer with an error status and {"detail": ...}."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def _json(doc: Any, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(doc), status=status, content_type="application/json")


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error as {"detail": ...} with its status; never an unhandled exception."""
    try:
        return await handler(request)
    except ApiError as e:
        return _json({"detail": e.detail}, status=e.status)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return _json({"detail": e.reason}, status=e.status)
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return _json({"detail": "internal error"}, status=500)
