"""Does the index equal the state the events imply? Used by the demo, tests and reindex."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from cardigan.event import primary_key
from cardigan.store.index import Index


@dataclass(frozen=True)
class Expected:
    """A live product's final state (deleted products map to None)."""

    version: int
    n_images: int
    model_version: str | None = None


@dataclass
class VerifyReport:
    products_live: int = 0
    products_deleted: int = 0
    vectors_expected: int = 0
    vectors_found: int = 0
    mismatches: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def summary(self) -> str:
        head = "verified" if self.ok else f"MISMATCH ({len(self.mismatches)} products differ)"
        return f"{head}: {self.products_live} live products, {self.vectors_found}/{self.vectors_expected} vectors, {self.products_deleted} deleted products absent"


def verify_index(
    index: Index, expected: Mapping[str, Expected | None], *, max_images: int, collection: str | None = None, chunk: int = 100
) -> VerifyReport:
    """Compare every product's rows (fetched by primary key) with what it should be."""
    rep = VerifyReport()
    pids = sorted(expected)
    for start in range(0, len(pids), chunk):
        part = pids[start : start + chunk]
        ids = [primary_key(p, i) for p in part for i in range(max_images)]
        rows = index.get(ids, ["product_id", "image_index", "version", "model_version"], collection)
        by_pid: dict[str, list[dict]] = {}
        for r in rows:
            by_pid.setdefault(r["product_id"], []).append(r)
        for pid in part:
            want, got = expected[pid], by_pid.get(pid, [])
            rep.vectors_found += len(got)
            if want is None:
                rep.products_deleted += 1
                if got:
                    rep.mismatches.append(
                        f"{pid}: deleted, but {len(got)} vector(s) remain (versions {sorted({r['version'] for r in got})})"
                    )
                continue
            rep.products_live += 1
            rep.vectors_expected += want.n_images
            versions = sorted({int(r["version"]) for r in got})
            indexes = sorted(int(r["image_index"]) for r in got)
            if indexes != list(range(want.n_images)):
                rep.mismatches.append(
                    f"{pid}: expected images 0..{want.n_images - 1} at v{want.version}, found images {indexes} at versions {versions}"
                )
            elif versions != [want.version]:
                rep.mismatches.append(f"{pid}: expected version {want.version}, found {versions}")
            elif want.model_version and {r["model_version"] for r in got} != {want.model_version}:
                rep.mismatches.append(f"{pid}: expected model {want.model_version}, found {sorted({r['model_version'] for r in got})}")
    return rep
