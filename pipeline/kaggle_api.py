"""What the Kaggle API's failures mean for a user: where the credentials go and what an HTTP status says to do.

Not a stage: `fetch` (the download) and `pipeline.tools.submit` (`make submit`) turn the API's errors into one-line
messages with them.
"""

from __future__ import annotations


def credentials_help(competition: str) -> str:
    return (
        "No Kaggle credentials found. Create an API token on https://www.kaggle.com/settings "
        "(API > Create New Token), then either set KAGGLE_API_TOKEN=<token> or save the token to "
        "~/.kaggle/access_token (the legacy ~/.kaggle/kaggle.json with username and key also works; "
        "chmod 600 it). A zip downloaded in a browser from "
        f"https://www.kaggle.com/competitions/{competition}/data works too: put it in downloads/ and run "
        f"'make repro ZIP=downloads/{competition}.zip'. To try the pipeline without Kaggle, run 'make demo' "
        "('make repro' puts params.yaml back to the demo's values when it fails)."
    )


def explain_http_error(competition: str, status: int | None, detail: str) -> str:
    url = f"https://www.kaggle.com/competitions/{competition}"
    if status == 403:
        return (
            f"Kaggle refused the download (403: {detail}). You must accept the competition rules "
            f"once, in a browser, logged in as the account of your token: open {url}/rules and click "
            "'I Understand and Accept', then run 'dvc repro fetch' again."
        )
    if status == 401:
        return (
            f"Kaggle rejected the credentials (401: {detail}). The token is wrong or expired: create "
            "a new one on https://www.kaggle.com/settings and update KAGGLE_API_TOKEN, "
            "~/.kaggle/access_token or ~/.kaggle/kaggle.json."
        )
    if status == 404:
        return f"Kaggle has no competition '{competition}' (404: {detail}): check fetch.competition."
    return f"Kaggle answered HTTP {status} ({detail}). Check {url} and try again later."
