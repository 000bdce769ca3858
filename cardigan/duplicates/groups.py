"""Pairs → groups: three listings of one product are one case for the reviewer, not three pairs."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from cardigan.duplicates.pairs import Pair


@dataclass(frozen=True)
class Group:
    """A connected component of the pair graph; ``best`` is its strongest evidence."""

    members: tuple[str, ...]
    pairs: tuple[Pair, ...]

    @property
    def best(self) -> Pair:
        return max(self.pairs, key=lambda p: (p.score, p.key))

    @property
    def id(self) -> str:
        """Stable while the group only grows by larger ids: its smallest member."""
        return self.members[0]

    def as_dict(self) -> dict:
        b = self.best
        return {
            "id": self.id,
            "members": list(self.members),
            "size": len(self.members),
            "pairs": len(self.pairs),
            "best": {
                "a": b.a,
                "b": b.b,
                "score": b.score,
                "a_image": b.a_image,
                "b_image": b.b_image,
                "a_version": b.a_version,
                "b_version": b.b_version,
            },
            "updated": max(p.time for p in self.pairs),
        }


def groups(pairs: Iterable[Pair], *, min_score: float = -1.0) -> list[Group]:
    """Connected components over the pairs scoring at least ``min_score`` (union-find), the
    largest and strongest first."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    kept = [p for p in pairs if p.score >= min_score]
    for p in kept:
        parent.setdefault(p.a, p.a)
        parent.setdefault(p.b, p.b)
        ra, rb = find(p.a), find(p.b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    members: dict[str, list[str]] = {}
    for x in parent:
        members.setdefault(find(x), []).append(x)
    edges: dict[str, list[Pair]] = {}
    for p in kept:
        edges.setdefault(find(p.a), []).append(p)
    out = [Group(tuple(sorted(members[r])), tuple(sorted(edges[r], key=lambda p: -p.score))) for r in members]
    return sorted(out, key=lambda g: (-len(g.members), -g.best.score, g.id))
