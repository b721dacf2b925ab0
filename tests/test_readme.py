"""The README's settings table and opening commands stay true."""

import re

from conftest import REPO, train_gpt


def readme() -> str:
    return (REPO / "README.md").read_text()


def test_every_setting_is_in_the_readme_table_with_its_default():
    rows = dict(re.findall(r"^\| `([A-Z0-9_]+)` \| ([^|]+) \|", readme(), flags=re.M))
    for s in train_gpt.SETTINGS:
        assert s.name in rows, f"{s.name} missing from the README table"
        default = int(s.default) if isinstance(s.default, bool) else s.default
        expected = f"`{default}`" if default != "" else "(empty)"
        assert rows[s.name].strip() == expected, f"{s.name}: README says {rows[s.name].strip()}, code says {expected}"
    names = {s.name for s in train_gpt.SETTINGS}
    assert set(rows) <= names, f"README lists settings the script does not have: {set(rows) - names}"


def test_readme_opens_with_the_main_job_and_the_test_command():
    first_block = readme().split("```bash", 1)[1].split("```", 1)[0]
    assert "torchrun --standalone --nproc_per_node=8 train_gpt.py" in first_block
    assert "bash .ci/run" in first_block
    ci = (REPO / ".ci" / "run").read_text()
    command = "python3 -m pytest -q -n 2 --dist loadfile tests"
    assert command in ci and f"`{command}`" in readme()
