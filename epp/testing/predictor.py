"""`epp-latency-predictor` as a child process on loopback (end-to-end tests, benchmarks)."""

from __future__ import annotations

import sys
from pathlib import Path

import aiohttp

from llmepp.testing.ports import free_port
from llmepp.testing.stack import ChildProcess


class PredictorProcess(ChildProcess):
    """`python -m llmepp.latencypredictor`, training and prediction servers on free loopback ports; ready once
    the prediction server answers /readyz."""

    name = "epp-latency-predictor"

    def __init__(self, log_path: Path, *extra_args: str) -> None:
        self.training_port, self.prediction_port = free_port(), free_port()
        args = [sys.executable, "-m", "llmepp.latencypredictor", "--host", "127.0.0.1",
                "--training-port", str(self.training_port), "--prediction-port", str(self.prediction_port),
                *extra_args]  # fmt: skip
        super().__init__(args, log_path)

    @property
    def training_url(self) -> str:
        return f"http://127.0.0.1:{self.training_port}"

    @property
    def prediction_url(self) -> str:
        return f"http://127.0.0.1:{self.prediction_port}"

    @property
    def epp_env(self) -> dict[str, str]:
        """The environment that points an EPP's predicted-latency-producer at this predictor."""
        return {"PREDICTION_SERVER_URL": self.prediction_url, "TRAINING_SERVER_URL": self.training_url}

    async def ready(self) -> bool:
        try:
            async with aiohttp.ClientSession() as s, s.get(f"{self.prediction_url}/readyz") as r:
                return r.status == 200
        except aiohttp.ClientError:
            return False
