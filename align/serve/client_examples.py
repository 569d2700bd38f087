"""What `align serve` prints once it is ready: calls to paste, with its real URL and model names."""

from __future__ import annotations

import json

# The environment variable the server and the printed calls read the API key from (never printed).
API_KEY_ENV = "ALIGN_API_KEY"


def client_examples(url: str, models: list[str], needs_key: bool) -> list[str]:
    """A `curl` command and an `openai` Python snippet that call this server, ready to paste.

    They ask for the first adapter (else the base) by its served name; the API key is read from
    $ALIGN_API_KEY, never printed.
    """
    model = models[1] if len(models) > 1 else models[0]
    body = json.dumps({"model": model, "prompt": "What is 2+3?", "max_tokens": 16})
    auth = f' -H "Authorization: Bearer ${API_KEY_ENV}"' if needs_key else ""
    key = f'os.environ["{API_KEY_ENV}"]' if needs_key else '"none"'
    return ["align serve: call it with curl (any model listed above goes in \"model\"):",
            f"curl -s {url}/completions -H 'Content-Type: application/json'{auth} -d '{body}'",
            "align serve: or in Python with the openai client:",
            "import os; from openai import OpenAI",
            f'client = OpenAI(base_url="{url}", api_key={key})',
            f'print(client.completions.create(model="{model}", prompt="What is 2+3?", max_tokens=16).choices[0].text)']
