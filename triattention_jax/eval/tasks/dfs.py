"""Recursive state query: simulate k steps of depth-first search, then report the state.

The TriAttention paper's recursion benchmark: a wrong intermediate state (say, a node
evicted from the cache while it is still on the stack) corrupts every later step. Graphs are
random and connected, drawn from the sample index; DFS starts at node 0 and visits
neighbours in ascending order. A step either pushes the smallest unvisited neighbour of the
current node (the top of the stack) or, if there is none, pops the current node.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

# A DFS over a connected graph of n nodes takes 2(n - 1) steps to return to its root, so 12
# nodes leave room for the largest step count.
NUM_NODES = 12
EXTRA_EDGES = 6
MIN_STEPS, MAX_STEPS = 6, 20

EXAMPLE = """Example. Graph (node: neighbours):
0: 1, 2
1: 0, 3
2: 0
3: 1
State after 3 steps: step 1 pushes 1, step 2 pushes 3, step 3 pops 3 (it has no unvisited neighbour).
Current: 1
Stack: [0, 1]
Visited: {0, 1, 3}"""


@dataclasses.dataclass(frozen=True)
class DfsState:
    """current node, stack from bottom (node 0) to top, visited set; None where an answer
    does not state a field in the expected form."""

    current: int | None
    stack: tuple[int, ...] | None
    visited: frozenset[int] | None

    def as_json(self) -> dict[str, Any]:
        return {
            "current": self.current,
            "stack": None if self.stack is None else list(self.stack),
            "visited": None if self.visited is None else sorted(self.visited),
        }


@dataclasses.dataclass(frozen=True)
class DfsProblem:
    adjacency: dict[int, tuple[int, ...]]
    steps: int
    answer: DfsState


def random_graph(
    rng: np.random.Generator, num_nodes: int = NUM_NODES, extra_edges: int = EXTRA_EDGES
) -> dict[int, tuple[int, ...]]:
    """A random spanning tree (so the graph is connected) plus `extra_edges` random edges."""
    order = rng.permutation(num_nodes)
    edges = {tuple(sorted((int(order[i]), int(order[rng.integers(i)])))) for i in range(1, num_nodes)}
    while len(edges) < num_nodes - 1 + extra_edges:
        edges.add(tuple(sorted(int(v) for v in rng.choice(num_nodes, 2, replace=False))))
    neighbours: dict[int, set[int]] = {v: set() for v in range(num_nodes)}
    for a, b in edges:
        neighbours[a].add(b)
        neighbours[b].add(a)
    return {v: tuple(sorted(n)) for v, n in neighbours.items()}


def dfs_state(adjacency: dict[int, tuple[int, ...]], steps: int, start: int = 0) -> DfsState:
    """The state after `steps` steps of ascending-neighbour DFS from `start`."""
    stack, visited = [start], {start}
    for step in range(steps):
        if not stack:
            raise ValueError(f"the search ended after {step} of {steps} steps")
        unvisited = [n for n in adjacency[stack[-1]] if n not in visited]
        if unvisited:
            stack.append(unvisited[0])
            visited.add(unvisited[0])
        else:
            stack.pop()
    if not stack:
        raise ValueError(f"the search ended at step {steps}")
    return DfsState(stack[-1], tuple(stack), frozenset(visited))


def dfs_problem(sample: int) -> DfsProblem:
    """Sample i: a graph drawn from seed i and k = 6 + i mod 15 steps."""
    adjacency = random_graph(np.random.default_rng(sample))
    steps = MIN_STEPS + sample % (MAX_STEPS - MIN_STEPS + 1)
    return DfsProblem(adjacency, steps, dfs_state(adjacency, steps))


def dfs_prompt(problem: DfsProblem) -> str:
    graph = "\n".join(f"{v}: {', '.join(map(str, n))}" for v, n in problem.adjacency.items())
    return (
        "Simulate depth-first search (DFS) on an undirected graph. The search starts at node 0: the stack is [0] and "
        "node 0 is visited. In each step, look at the current node (the top of the stack): if it has unvisited "
        "neighbours, push the smallest of them onto the stack and mark it visited; otherwise pop the current node, "
        "and the new top of the stack becomes the current node.\n\n"
        f"{EXAMPLE}\n\n"
        f"Graph (node: neighbours):\n{graph}\n\n"
        f"Simulate exactly {problem.steps} steps, one line per step, then give the state after step {problem.steps} "
        "in the same format as the example (Current, Stack, Visited)."
    )


def _numbers(text: str) -> list[int] | None:
    items = [item.strip() for item in text.split(",")] if text.strip() else []
    return [int(item) for item in items] if all(item.isdigit() for item in items) else None


def parse_dfs_answer(text: str) -> DfsState:
    """The last `Current: n`, `Stack: [..]` and `Visited: {..}` (or `[..]`) in the text."""
    current = re.findall(r"current(?: node)?\s*[:=]\s*(\d+)", text, re.IGNORECASE)
    stack = re.findall(r"stack\s*[:=]\s*\[([^\]\n]*)\]", text, re.IGNORECASE)
    visited = re.findall(r"visited(?: set)?\s*[:=]\s*[{\[]([^}\]\n]*)[}\]]", text, re.IGNORECASE)
    stack_items = _numbers(stack[-1]) if stack else None
    visited_items = _numbers(visited[-1]) if visited else None
    return DfsState(
        int(current[-1]) if current else None,
        None if stack_items is None else tuple(stack_items),
        None if visited_items is None else frozenset(visited_items),
    )


def dfs_metrics(truth: DfsState, answer: DfsState) -> dict[str, float]:
    return {
        "stack_exact": float(answer.stack == truth.stack),
        "current_exact": float(answer.current == truth.current),
        "visited_exact": float(answer.visited == truth.visited),
    }
