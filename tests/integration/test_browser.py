"""The daemon's topology page in a real headless Chromium (Debian's, via chromedriver)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.conftest import ARTIFACTS, VmFactory, requires_qemu
from tests.integration.test_daemon import Daemon, daemon, fakevfio, misbound_vm, wait_for

__all__ = ["daemon", "fakevfio"]  # fixtures used here
pytestmark = [pytest.mark.integration, requires_qemu]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _browser():  # type: ignore[no-untyped-def]
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        if os.environ.get("CI"):
            raise AssertionError("chromium missing: deploy/install-dev.sh installs it")
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1100,900",
    ):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    return webdriver.Chrome(options=options, service=service)


def test_topology_page_shows_the_misbound_device(
    qemu_vm: VmFactory, daemon: Callable[..., Daemon], tmp_path: Path, fakevfio: Path
) -> None:
    vm = misbound_vm(qemu_vm, tmp_path, fakevfio, "vm1")
    name = f"unix:{vm.qmp_path}"
    d = daemon("--watch", str(tmp_path / "vm*[0-9].qmp"), "--interval", "30")
    wait_for(lambda: d.vms().get(name, {}).get("status") == "ok", what="inspection")
    pci_devices = len(d.vm(name)["devices"])
    from selenium.webdriver.common.by import By

    browser = _browser()
    try:
        browser.get(f"http://127.0.0.1:{d.port}/")
        browser.find_element(By.LINK_TEXT, name).click()  # linked from the status page
        assert browser.current_url.endswith(f"/vms/{quote(name, safe='')}")
        svg = browser.find_element(By.CSS_SELECTOR, "svg[role=img]")
        devices = svg.find_elements(By.CSS_SELECTOR, "g.device")
        assert len(devices) == pci_devices  # one node per PCI device
        bad = svg.find_elements(By.CSS_SELECTOR, "g.device.misbound")
        assert len(bad) == 1
        assert "MISBOUND (QG001)" in bad[0].text  # a text label, not colour alone
        title = bad[0].find_element(By.TAG_NAME, "title").get_attribute("textContent")
        assert "cmdline: before" in title  # the evidence, on hover
        assert "QG001 CRITICAL" in browser.find_element(By.TAG_NAME, "body").text
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "topology-page.png"))
    finally:
        browser.quit()
