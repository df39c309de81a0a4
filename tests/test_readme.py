"""The README's notebook-style example runs as written, so the documented API cannot rot."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
  assert blocks, "README.md has no ```python example"
  for block in blocks:
    exec(compile(block, str(README), "exec"), {"__name__": "readme"})  # pylint: disable=exec-used
