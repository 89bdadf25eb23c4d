"""The play page (play.py) in a real headless Chromium, driven by playwright's sync API: what the browser test
and benchmarks/gamengen_browser.py use.

The system Chromium is used (no `playwright install`), with a throwaway profile and the flags below: no
sandbox (containers), no GPU, nothing that reaches the network on its own. The page exposes
`window.playStats()`: {frames, fps_window, fps_session, session_ms, latency_ms, server_ms, engine_ms}, where
latency_ms holds one input-to-frame latency per held-key change (play_page.html says what is measured).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--no-proxy-server"]


def unavailable() -> str | None:
  """Why headless Chromium cannot be driven here, or None when it can."""
  if not os.path.exists(CHROMIUM):
    return f"no {CHROMIUM}: apt-get install chromium chromium-driver"
  if importlib.util.find_spec("playwright") is None:
    return "no playwright: pip install playwright (no `playwright install`: the system Chromium is used)"
  return None


@contextlib.contextmanager
def chromium() -> Iterator:
  """A headless Chromium in a temporary profile; yields its playwright BrowserContext (`.new_page()`)."""
  from playwright.sync_api import sync_playwright

  user_data = tempfile.mkdtemp(prefix="lwjax-play-chromium-")
  try:
    with sync_playwright() as p:
      browser = p.chromium.launch_persistent_context(user_data, executable_path=CHROMIUM, headless=True,
                                                     args=CHROMIUM_FLAGS)
      try:
        yield browser
      finally:
        browser.close()
  finally:
    shutil.rmtree(user_data, ignore_errors=True)


def play_stats(page) -> dict:
  """The page's `playStats()` for the game it plays."""
  return page.evaluate("playStats()")
