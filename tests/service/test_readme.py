"""README.md's settings table is what `settings_table_markdown()` gives (nothing regenerates it)."""
from __future__ import annotations

import re
from pathlib import Path

from service.settings import settings_table_markdown


def test_readme_settings_table_is_current() -> None:
    """If this fails, paste `settings_table_markdown()` between the README's settings-table markers."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    found = re.search(r"<!-- settings-table:start -->\n(.*?)\n<!-- settings-table:end -->", readme, re.S)
    assert found, "README.md lacks the settings-table markers"
    assert found.group(1).strip() == settings_table_markdown()
