"""The README's Python API example runs exactly as written (on the tiny random backbone, in seconds)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
API_HEADING = "## Python API"


def readme_example(text: str, heading: str = API_HEADING) -> str:
    """The first ```python block after `heading` in `text`."""
    after = text.split(f"\n{heading}\n", 1)
    assert len(after) == 2, f"README.md has no {heading!r} section"
    block = re.search(r"```python\n(.*?)```", after[1], re.S)
    assert block, f"README.md's {heading!r} section has no ```python block"
    return block.group(1)


def test_readme_api_example_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the example writes my-gate.safetensors where it runs
    code = readme_example(README.read_text())
    namespace = {"__name__": "__readme__"}
    exec(compile(code, f"{README}:{API_HEADING}", "exec"), namespace)
    assert (tmp_path / "my-gate.safetensors").is_file()
    assert len(namespace["texts"]) == len(namespace["prompts"])
