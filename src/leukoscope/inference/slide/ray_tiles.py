"""The tiles of a whole-slide image analysed by Ray actors (``leukoscope analyze slide.svs --engine ray``).

Each actor builds its :class:`~leukoscope.inference.smear.SmearAnalyzer` once (the models load
once per actor) and opens each slide file itself: tile positions travel, not pixels, so on a
cluster the slide must be on storage every node sees at the same path. The driver keeps the
sampling (:func:`~leukoscope.inference.slide.sampler.sample_until`): the seeded tile order, the
stop at the target and the count are the local engine's, whatever the number of actors.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

from leukoscope.inference.archive import AnalyzerSpec, actor_analyzer, actor_count, require_ray
from leukoscope.inference.slide.analysis import TileJob
from leukoscope.inference.slide.monolayer import TileSpot
from leukoscope.inference.slide.reader import Slide, open_slide
from leukoscope.inference.smear_result import SmearResult


class SlideTileActor:
    """A Ray actor: one analyzer, open slides kept open between tiles."""

    def __init__(self, spec: AnalyzerSpec, threads: int) -> None:
        self.analyzer = actor_analyzer(spec, threads)
        self.slides: dict[str, Slide] = {}

    def analyze(self, job: TileJob, spot: TileSpot) -> SmearResult:
        if job.path not in self.slides:
            self.slides[job.path] = open_slide(job.path)
        return job.run(self.analyzer, self.slides[job.path], spot)


class RayTileRunner:
    """A pool of :class:`SlideTileActor` on the connected Ray cluster (``ray.init`` first:
    :func:`~leukoscope.inference.archive.ray_session`); tiles go to the actors in turn.
    ``actors`` (default: the cluster's CPUs / ``threads``) of ``threads`` CPUs each."""

    def __init__(self, spec: AnalyzerSpec, *, actors: int | None = None, threads: int = 1) -> None:
        require_ray()
        import ray

        if threads < 1 or (actors is not None and actors < 1):
            raise ValueError("actors and threads must be at least 1")
        remote = ray.remote(num_cpus=threads)(SlideTileActor)
        self.workers = actor_count(actors, threads)
        self.actors: list[Any] = [remote.remote(spec.portable(), threads) for _ in range(self.workers)]
        self._turn = 0

    def submit(self, job: TileJob, spot: TileSpot) -> Future[SmearResult]:
        actor = self.actors[self._turn % len(self.actors)]
        self._turn += 1
        return actor.analyze.remote(job, spot).future()

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    def __enter__(self) -> "RayTileRunner":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
