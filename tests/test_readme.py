"""The README's Python examples, executed as written, so they cannot rot."""

from __future__ import annotations

import contextlib
import io
import re

from conftest import REPO_ROOT


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", (REPO_ROOT / "README.md").read_text(), flags=re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        for index, block in enumerate(blocks):
            exec(compile(block, f"README.md python block {index}", "exec"), namespace)
    assert "Paris" in printed.getvalue()
    # The TriAttention example decodes past its buffer of 64 + 128 slots, so it really evicts.
    result = namespace["result"]
    assert result.num_generated_tokens[0] == 200 or result.token_ids[0][-1] in namespace["model"].config.eos_token_ids
    assert namespace["logprobs"].shape == (1, len(namespace["tokens"][0]) - 1)
