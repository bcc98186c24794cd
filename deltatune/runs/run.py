"""A finished run folder, opened once: what `eval`, `generate`, `chat`, `export`, `merge` and `compare` read.

A run folder holds `config.yaml` (resolved), `best/` (the best delta, with the chat template training used),
`checkpoints/`, `results.json`, metrics and the report (see runs/folder.py). Every file in it is untrusted data:
its config cannot switch on remote code (only the caller's `trust_remote_code` can), and the names it points to
stay inside the folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from deltatune import storage
from deltatune.config import RunConfig, read_config, validate_config
from deltatune.errors import CheckpointError, ConfigError
from deltatune.runs.folder import CONFIG_NAME
from deltatune.safety import inside

RESULTS_FILE = "results.json"
BEST = "best"


@dataclass(frozen=True)
class Run:
    """A run folder and its validated config; its best delta's folder, chat template and results.json are found
    and read when first asked for."""

    folder: Path
    config: RunConfig

    @classmethod
    def open(cls, folder: str | Path, overrides: list[str] = (), *, trust_remote_code: bool = False) -> Run:
        """The run in `folder`, its config with `key=value` overrides applied and validated (data files named in it
        may be gone: runs.session.run_session checks them)."""
        folder = Path(folder)
        file = folder / CONFIG_NAME
        if not file.is_file():
            raise ConfigError(f"{folder} is not a run folder: {CONFIG_NAME} not found (train one with "
                              "`deltatune train`)")
        config = validate_config(read_config(file, overrides), where=str(file), trust_remote_code=trust_remote_code,
                                 files=False)
        return cls(folder, config)

    @cached_property
    def best(self) -> Path:
        """The folder of the best delta; ConfigError until training finished."""
        best = inside(self.folder, BEST, str(self.folder))
        if not best.is_dir():
            raise ConfigError(f"{self.folder} has no trained delta yet ({best} missing): finish or resume the run "
                              "first")
        return best

    @property
    def checkpoints(self) -> Path:
        return self.folder / "checkpoints"

    @cached_property
    def template(self) -> str | None:
        """The chat template training rendered the examples with (None: the run trained on no chat data)."""
        from deltatune.generation.prompts import saved_template

        return saved_template(self.best, self.folder)

    @cached_property
    def results(self) -> dict[str, Any]:
        """results.json: metrics, sizes and timings of the finished training (CheckpointError if unreadable)."""
        file = inside(self.folder, RESULTS_FILE, str(self.folder))
        try:
            results = storage.read_json(file)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{file}: not the results of a finished run ({exc}); train it again") from None
        if not isinstance(results, dict):
            raise CheckpointError(f"{file}: not the results of a finished run (a JSON {type(results).__name__}, "
                                  "not an object); train it again")
        return results

    def base_options(self) -> dict[str, Any]:
        """How the run loads its base model: `load_model`'s dtype and compute_dtype (auto resolved), quantize,
        trust_remote_code."""
        model = self.config.model
        return dict(**self.config.base_precision(), quantize=model.quantize, trust_remote_code=model.trust_remote_code)

    def causal_lm(self) -> Run:
        """This run, if it trained a text generator; else a ConfigError."""
        if self.config.task != "causal_lm":
            formats = ", ".join(d.format for d in self.config.data_configs().values())
            raise ConfigError(f"{self.folder} is a {self.config.task} run (data.format: {formats}); generating text "
                              "needs a run trained on text or chat data")
        return self
