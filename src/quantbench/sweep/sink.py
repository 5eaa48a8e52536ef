"""Where finished runs go: the card as JSON and Markdown, then one committed store transaction each."""

from __future__ import annotations

from pathlib import Path

from quantbench.cards import to_markdown
from quantbench.errors import StoreError
from quantbench.store import ResultsStore
from quantbench.store.owner import current_owner
from quantbench.sweep.execute import RunRecord
from quantbench.sweep.job import Job
from quantbench.utils.io import atomic_write_json, atomic_write_text


def write_card_files(cards_dir: Path, run_id: str, card: dict) -> None:
    """``cards/RUN_ID.json`` and ``cards/RUN_ID.md``, each written atomically."""
    try:
        for path in (atomic_write_json(cards_dir / f"{run_id}.json", card),
                     atomic_write_text(cards_dir / f"{run_id}.md", to_markdown(card))):
            path.chmod(0o644)
    except OSError as exc:
        raise StoreError(f"cannot write the card of run {run_id} to {cards_dir}: {exc.strerror or exc} "
                         "(the run itself is stored; `quantbench card RUN_ID` prints it)") from exc


class StoreSink:
    """Claim each run in the store before it starts, commit it when it finishes; write the cards of
    finished runs. The owner of the claims is this (the parent) process; workers never write."""

    def __init__(self, store: ResultsStore, cards_dir: Path | None) -> None:
        self.store = store
        self.cards_dir = cards_dir
        self.owner = str(current_owner())

    def started(self, job: Job) -> bool:
        """Claim the run; False when another process has finished it or is running it."""
        return self.store.claim(job.run_id, job.columns(), self.owner)

    def finished(self, job: Job, record: RunRecord) -> None:
        # card files first: a kill between the two leaves an orphan card that the rerun overwrites, never
        # a finished run without its card
        if record.card is not None and self.cards_dir is not None:
            write_card_files(self.cards_dir, job.run_id, record.card)
        self.store.save(job.run_id, {**job.columns(), **record.columns()}, owner=self.owner)
