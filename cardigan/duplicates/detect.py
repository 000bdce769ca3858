"""Find a batch of products' double listings in the index: one range search (and one read by
primary key, for the products whose rows the caller does not hold).

Two products are a candidate double listing when their best-matching pair of images scores
above the threshold: the cosine less a colour-signature distance, part of which a matching
structure forgives (cardigan/duplicates/score.py); only such pairs are recorded.
A check replaces the product's pairs with what it finds now, so a modify that changed the photos
drops the pairs that no longer hold, and a deleted product (no rows left) loses all of its pairs.

The worker that wrote a product holds its rows (``known``): they are the rows in the index at the
version claimed, so they are not read back; any field the writer put in a row travels with it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from cardigan.duplicates.groups import Group
from cardigan.duplicates.pairs import PairStore
from cardigan.duplicates.score import Scoring, best_pairs
from cardigan.event import primary_key
from cardigan.store.index import Index
from config.settings import DuplicateSettings

ROW_FIELDS = ["pk", "product_id", "image_index", "version", "embedding", "crop"]  # crop: the colour signature
HIT_FIELDS = ["product_id", "image_index", "version", "crop"]
MAX_NQ = 1024  # query vectors per search call (a server caps nq at 16,384; smaller calls time out less)


@dataclass
class CheckResult:
    products: int = 0
    vectors: int = 0
    added: int = 0
    dropped: int = 0
    new_groups: list[Group] = field(default_factory=list)
    seconds: float = 0.0
    read: int = 0  # products whose rows were read back from the index
    searches: int = 0  # range-search calls


class Detector:
    """Checks products against the rest of the alias and records what it finds in a PairStore."""

    def __init__(
        self, index: Index, store: PairStore, *, threshold: float, max_images: int, hits_per_image: int = 8, scoring: Scoring | None = None
    ) -> None:
        self.index = index
        self.scoring = scoring or Scoring()
        self.store = store
        self.threshold = threshold
        self.max_images = max_images
        self.hits_per_image = hits_per_image

    @classmethod
    def from_settings(cls, index: Index, store: PairStore, d: DuplicateSettings, *, max_images: int) -> Detector:
        """As ``duplicates`` settings say (the workers' detector and ``duplicates scan`` alike)."""
        return cls(
            index, store, threshold=d.threshold, max_images=max_images, hits_per_image=d.hits_per_image, scoring=Scoring.from_settings(d)
        )

    def check(self, product_ids: list[str], known: dict[str, list[dict[str, Any]]] | None = None) -> CheckResult:
        """Check and record; raises IndexUnavailable / redis errors (the caller retries later).

        ``known``: rows of some of the products (at least ROW_FIELDS; ``[]``: deleted) as they
        are in the index now; the others are read back."""
        t0 = time.perf_counter()
        pids = list(dict.fromkeys(product_ids))
        have = known or {}
        todo = [p for p in pids if p not in have]
        # Strong: the rows were just written (or deleted) by another client; Session would not see them
        keys = [primary_key(p, i) for p in todo for i in range(self.max_images)]
        rows = [r for p in pids if p in have for r in have[p]]
        if keys:
            rows += self.index.get(keys, ROW_FIELDS, consistency="Strong")
        hits: list[list[dict]] = []
        calls = 0
        for i in range(0, len(rows), MAX_NQ):
            chunk = rows[i : i + MAX_NQ]
            # Strong as well: a product written a moment ago by another worker must be seen, or two
            # copies published together would each miss the other
            hits += self.index.range_search(
                [r["embedding"] for r in chunk], self.threshold, self.hits_per_image, fields=HIT_FIELDS, consistency="Strong"
            )
            calls += 1
        # the range search's radius bounds the cosine; the pair must clear the threshold as a score too
        best = best_pairs(rows, hits, self.scoring, min_score=self.threshold)
        found = {pid: sorted(best.get(pid, {}).values(), key=lambda p: -p.score) for pid in pids}
        added, dropped, fresh = self.store.replace(found)
        return CheckResult(len(pids), len(rows), added, dropped, fresh, time.perf_counter() - t0, len(todo), calls)
