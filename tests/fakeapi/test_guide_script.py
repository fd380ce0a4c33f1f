"""The guide's complete bash script (curl + jq) runs unchanged against the fake, but the host."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

import pytest

from batchd.fakeapi.server import FakeApiConfig, FakeApiServer
from tests.support.tools import require_executable

GUIDE = Path(__file__).resolve().parents[3] / "shared" / "docs" / "batch-processing-guide.md"


def guide_script() -> str:
    text = GUIDE.read_text()
    section = text.split("## Complete Batch Processing Script", 1)[1]
    match = re.search(r"```bash\n(.*?)```", section, re.DOTALL)
    assert match, "the guide's complete script is a ```bash block"
    return match.group(1)


@pytest.mark.skipif(not GUIDE.exists(), reason="needs ../shared/docs beside the repository")
async def test_the_guides_complete_script_runs_against_the_fake() -> None:
    require_executable("curl", "curl")
    require_executable("jq", "jq")
    async with FakeApiServer(FakeApiConfig(processing_seconds=0, seed=1)) as fake:
        script = guide_script().replace("https://api.anthropic.com", fake.base_url)
        assert fake.base_url in script  # the host is the only change
        process = await asyncio.create_subprocess_exec(
            "bash",
            "-c",
            script,
            env={**os.environ, "ANTHROPIC_API_KEY": "sk-ant-test"},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 60)
    output = out.decode()
    assert process.returncode == 0, err.decode()
    assert "Status: ended (succeeded: 3, processing: 0)" in output
    assert "Batch processing complete!" in output
    for custom_id, prompt in (
        ("task-1", "Hello, world!"),
        ("task-2", "What is 2+2?"),
        ("task-3", "Name a color."),
    ):
        assert re.search(rf"\[{custom_id}\]: Response to: {re.escape(prompt)}", output), output
