"""`epp-latency-predictor`: the latency predictor service for `predicted-latency-producer`.

    epp-latency-predictor                                   # training :8000 + prediction :8001, one process
    epp-latency-predictor --mode training --training-port 8000
    epp-latency-predictor --mode prediction --prediction-port 8001 --training-server-url http://trainer:8000

Point the EPP at it with PREDICTION_SERVER_URL / TRAINING_SERVER_URL (or the producer's
`predictionServerURL` / `trainingServerURL` parameters). Flags default to the reference's environment
variables (LATENCY_RETRAINING_INTERVAL_SEC, LATENCY_MIN_SAMPLES_FOR_RETRAIN, LATENCY_QUANTILE_ALPHA, ...).
Prints `epp-latency-predictor: ready training=<url> prediction=<url>` once it serves; SIGTERM / SIGINT stop it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from llmepp.latencypredictor.server import PredictorService, Settings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="epp-latency-predictor",
        description="Online TTFT/TPOT predictor (llm-d latency predictor HTTP API).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument("--mode", choices=("both", "training", "prediction"), help="servers to run (default both)")
    p.add_argument("--host", help="bind address (default 127.0.0.1; env PREDICT_HOST)")
    p.add_argument("--training-port", type=int, help="training server port (default 8000; 0 = any free port)")
    p.add_argument("--prediction-port", type=int, help="prediction server port (default 8001; env PREDICT_PORT)")
    p.add_argument("--training-server-url", help="--mode prediction: where to sync the model from")
    p.add_argument("--retraining-interval", type=float, help="seconds between refits (default 10)")
    p.add_argument("--min-samples", type=int, help="samples a target needs before it is fitted (default 10)")
    p.add_argument("--max-samples-per-bucket", type=int, dest="max_per_bucket", help="window per bucket (500)")
    p.add_argument("--quantile", type=float, help="predicted quantile (default 0.9)")
    p.add_argument("--objective", choices=("quantile", "mean"), help="quantile (default) or mean")
    p.add_argument("--prior-strength", type=float, help="weight of the prior, in samples (default 1)")
    p.add_argument("--model-sync-interval", type=float, help="--mode prediction: seconds between syncs (10)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


async def serve(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    service = PredictorService(settings)
    urls = await service.start()
    print(
        f"epp-latency-predictor: ready training={urls.get('training', '-')} prediction={urls.get('prediction', '-')}",
        flush=True,
    )
    try:
        await stop.wait()
    finally:
        await service.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    overrides = {k: v for k, v in vars(args).items() if k != "verbose" and v is not None}
    try:
        settings = Settings.from_env(**overrides)
    except (ValueError, TypeError) as e:
        print(f"epp-latency-predictor: configuration error: {e}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(settings))
    except OSError as e:
        print(f"epp-latency-predictor: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
