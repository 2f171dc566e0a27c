"""The tiles of a whole-slide image analysed by Ray actors (``leukoscope analyze slide.svs --engine ray``).

Each actor builds its :class:`~leukoscope.inference.smear.SmearAnalyzer` once (the models load
once per actor) and opens each slide file itself: tile positions travel, not pixels, so on a
cluster the slide must be on storage every node sees at the same path. The driver keeps the
sampling (:func:`~leukoscope.inference.slide.sampler.sample_until`): the seeded tile order, the
stop at the target and the count are the local engine's, whatever the number of actors.
"""

from __future__ import annotations

from concurrent.futures import Future, InvalidStateError
from typing import Any

from leukoscope.inference.archive import AnalyzerSpec, actor_analyzer, actor_count, require_ray
from leukoscope.inference.slide.analysis import TileJob
from leukoscope.inference.slide.monolayer import TileSpot
from leukoscope.inference.slide.reader import Slide, open_slide
from leukoscope.inference.smear_result import SmearResult


class SlideTileActor:
    """A Ray actor: one analyzer, and the slide it is reading kept open between its tiles."""

    def __init__(self, spec: AnalyzerSpec, threads: int) -> None:
        self.analyzer = actor_analyzer(spec, threads)
        self.slide: Slide | None = None
        self.slide_path = ""

    def analyze(self, job: TileJob, spot: TileSpot) -> SmearResult:
        if self.slide is None or self.slide_path != job.path:
            if self.slide is not None:  # one slide open at a time: a run over hundreds must not keep them all
                self.slide.close()
                self.slide = None
            self.slide, self.slide_path = open_slide(job.path), job.path
        return job.run(self.analyzer, self.slide, spot)


def _cause(error: BaseException) -> BaseException:
    """The exception raised inside the actor (a SlideError, say), not Ray's wrapper with its traceback."""
    from ray.exceptions import RayTaskError

    return error.cause if isinstance(error, RayTaskError) and error.cause is not None else error


class RayTileRunner:
    """A pool of :class:`SlideTileActor` on the connected Ray cluster (``ray.init`` first:
    :func:`~leukoscope.inference.archive.ray_session`); tiles go to the actors in turn.
    ``actors`` (default: as many as the cluster's nodes can place) of ``threads`` CPUs each.
    An actor that dies (a node lost, out of memory) is restarted and its tile tried again: a
    tile's analysis has no side effects."""

    def __init__(self, spec: AnalyzerSpec, *, actors: int | None = None, threads: int = 1) -> None:
        require_ray()
        import ray

        if threads < 1 or (actors is not None and actors < 1):
            raise ValueError("actors and threads must be at least 1")
        remote = ray.remote(num_cpus=threads, max_restarts=2, max_task_retries=2)(SlideTileActor)
        self.workers = actor_count(actors, threads)
        self.actors: list[Any] = [remote.remote(spec.portable(), threads) for _ in range(self.workers)]
        self._turn = 0

    def submit(self, job: TileJob, spot: TileSpot) -> Future[SmearResult]:
        """The tile's result to come; cancelling it removes the tile from its actor's queue."""
        import ray

        actor = self.actors[self._turn % len(self.actors)]
        self._turn += 1
        ref = actor.analyze.remote(job, spot)
        result: Future[SmearResult] = Future()

        def finish(done: Future) -> None:
            error = done.exception()
            try:
                if error is None:
                    result.set_result(done.result())
                else:
                    result.set_exception(_cause(error))
            except InvalidStateError:  # cancelled meanwhile: nobody waits for it
                pass

        def cancelled(future: Future) -> None:
            if future.cancelled():
                ray.cancel(ref)

        result.add_done_callback(cancelled)
        ref.future().add_done_callback(finish)
        return result

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    def __enter__(self) -> "RayTileRunner":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
