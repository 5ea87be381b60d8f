"""The project's vocabulary, each word defined once; other modules, CLI choices and the store derive from it.

Pure (stdlib only), so every layer may import it.
"""

from __future__ import annotations

from enum import StrEnum

# --- jobs and the event stream (edge.service, edge.client) ----------------------------------

class JobState(StrEnum):
    """Where a job stands; the store's ``jobs.state`` CHECK, the proto's ``JobState`` and the CLI's
    ``--state`` choices list exactly these. A StrEnum: ``JobState.DONE == "done"``.

    >>> [str(s) for s in JobState if s.terminal]
    ['done', 'failed', 'cancelled']
    """

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """True when the job will not change by itself any more (done, failed for good, cancelled)."""
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


JOB_STATES: tuple[str, ...] = tuple(state.value for state in JobState)
TERMINAL_JOB_STATES: tuple[str, ...] = tuple(state.value for state in JobState if state.terminal)
# Trailing metadata of an ended WatchEvents stream: the last sequence sent, where the client resumes.
LAST_SEQUENCE_KEY = "mitosis-edge-last-sequence"



# --- slides and detections (edge.wsi, edge.analysis) -----------------------------------------


# --- engines (edge.engines: backends, TensorRT) ----------------------------------------------


# --- the command line (edge.cli) -------------------------------------------------------------
