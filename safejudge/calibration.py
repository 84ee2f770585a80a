"""Calibrated thresholds for one (model, constitution): written by `safejudge calibrate`, applied by the
server's constitution store to the constitution and model it names."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from safejudge.constitution import Constitution

CALIBRATION_SUFFIX = ".calibration.json"


class Calibration(BaseModel):
    """Thresholds fitted for one (model, constitution) on a labelled dev split."""

    model_config = ConfigDict(extra="forbid")

    model_id: str
    constitution: str
    constitution_hash: str
    thresholds: dict[str, float]
    dev_split: str = Field("", description="what the dev split was: the generated toy bench, or a labels file")
    dev_seed: int | None = Field(None, description="the generated dev bench's seed (None: a user's labelled images)")
    dev_images: int
    dev_f1: float
    dev_reasoning_calls_per_image: float
    default_f1: float = Field(description="F1 on the same dev split with the constitution's own thresholds")

    def check(self, constitution: Constitution, model_id: str) -> None:
        if (self.constitution, self.constitution_hash, self.model_id) != (
            constitution.name, constitution.content_hash(), model_id,
        ):
            raise ValueError(
                f"calibration is for constitution {self.constitution} ({self.constitution_hash}) with model "
                f"{self.model_id}, not {constitution.name} ({constitution.content_hash()}) with {model_id}"
            )

    @classmethod
    def load(cls, path: Path) -> Calibration:
        return cls.model_validate_json(Path(path).read_text())

    def applied_to(self, constitution: Constitution) -> Constitution:
        """The constitution with these thresholds in place of its own."""
        return constitution.model_copy(update={"thresholds": constitution.thresholds.merged(self.thresholds)})
