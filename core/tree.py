"""Draft trees: nodes in topological order, each naming its parent.

``parents[i] < i``; ``ROOT`` (-1) marks a child of the root, the last verified token. The
attention mask, the depths (hence positions) and the root-to-leaf paths all derive from
``parents``, so nothing else needs to travel with a tree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ROOT = -1


@dataclass(frozen=True)
class DraftTree:
    token_ids: torch.Tensor  # [num_nodes] int64
    parents: torch.Tensor  # [num_nodes] int64, parents[i] < i, ROOT for children of the root

    def __post_init__(self) -> None:
        if self.token_ids.dim() != 1 or self.token_ids.shape != self.parents.shape:
            raise ValueError(
                f"token_ids {tuple(self.token_ids.shape)} and parents "
                f"{tuple(self.parents.shape)} must be equal 1-D shapes"
            )
        parents = self.parents.tolist()  # trees are small: Python beats a handful of tensor ops
        if not all(ROOT <= p < i for i, p in enumerate(parents)):
            raise ValueError(f"parents must satisfy ROOT <= parents[i] < i, got {parents}")

    @property
    def num_nodes(self) -> int:
        return int(self.parents.shape[0])

    def depths(self) -> torch.Tensor:
        """``[num_nodes]`` int64: 1 for children of the root, parent depth + 1 below."""
        depth: list[int] = []
        for p in self.parents.tolist():  # plain Python: one tensor op per node would cost more
            depth.append(1 if p == ROOT else depth[p] + 1)
        return torch.tensor(depth, dtype=torch.long)

    def ancestor_mask(self) -> torch.Tensor:
        """``[num_nodes, num_nodes]`` bool: ``mask[i, j]`` iff j is i or an ancestor of i."""
        n = self.num_nodes
        rows: list[list[bool]] = []  # row i: its parent's row with i added
        for i, p in enumerate(self.parents.tolist()):
            row = rows[p].copy() if p != ROOT else [False] * n
            row[i] = True
            rows.append(row)
        return torch.tensor(rows, dtype=torch.bool).view(n, n)  # view: an empty tree is [0, 0]

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root's child down to ``node``, inclusive."""
        path = []
        while node != ROOT:
            path.append(node)
            node = int(self.parents[node])
        return path[::-1]

    def leaves(self) -> list[int]:
        has_child = set(self.parents.tolist())
        return [i for i in range(self.num_nodes) if i not in has_child]
