"""The daemon's pages in a real headless Chromium (Debian's, via chromedriver), over real
HTTP from a real daemon inspecting real QEMU VMs (the VFIO emulation for vfio-pci).

- A 70-device q35 VM (root ports, three bridge levels, ids like
  `nvidia-a100-passthrough-gpu-0`, a vIOMMU without id, one vfio-pci misordered before
  the vIOMMU deep in the list): no two text boxes overlap and none is cut, folded or
  opened; at 800 px every verdict word lies inside the viewport without horizontal
  scrolling; the misbound device is reachable from the first screen.
- 50 small real VMs (8 critical, 4 unknown: their only monitor held by another client,
  5 warning, 15 with vfio devices all ok, 18 without vfio device): the status page counts
  them, lists the critical ones first and all on the first screen, and filters problems.

Screenshots at 1280 and 800 px go to tests/artifacts/. One QEMU build (the first of the
matrix): the pages do not depend on QEMU's version, and 50 VMs per build would triple the
time.
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from qemu.qmp import QMPClient

from qmpguard.demo.fakevfio import VfioDeviceSpec, create_sysfs_device, emulation_env
from qmpguard.demo.qemu_process import QemuProcess
from tests.conftest import ARTIFACTS, QEMU_MATRIX, VmFactory, requires_qemu
from tests.integration.support import Daemon, wait_for

pytestmark = [
    pytest.mark.integration,
    requires_qemu,
    pytest.mark.parametrize("qemu_vm", [next(iter(QEMU_MATRIX))], indirect=True),
]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
WIDE, NARROW, HEIGHT = 1280, 800, 900
VERDICT_WORDS = ("MISBOUND", "UNVERIFIED", "ok")

#: Every text fragment's box (one per line it spans), then the pairs that overlap by more
#: than a pixel and the boxes cut by the viewport's edges; plus the page's scroll width.
TEXT_BOXES_JS = """
const boxes = [];
const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
for (let n = walker.nextNode(); n; n = walker.nextNode()) {
  // checkVisibility: false inside a closed <details> (content-visibility: hidden)
  if (!n.textContent.trim() || !n.parentElement.checkVisibility()) continue;
  const range = document.createRange();
  range.selectNodeContents(n);
  for (const r of range.getClientRects()) {
    if (r.width > 0 && r.height > 0)
      boxes.push({l: r.left, t: r.top, r: r.right, b: r.bottom,
                  text: n.textContent.trim().slice(0, 50)});
  }
}
const overlaps = [];
for (let i = 0; i < boxes.length; i++)
  for (let j = i + 1; j < boxes.length; j++) {
    const a = boxes[i], b = boxes[j];
    const w = Math.min(a.r, b.r) - Math.max(a.l, b.l);
    const h = Math.min(a.b, b.b) - Math.max(a.t, b.t);
    if (w > 1 && h > 1) overlaps.push([a.text, b.text]);
  }
const width = document.documentElement.clientWidth;
const cut = boxes.filter(b => b.l < -0.5 || b.r > width + 0.5).map(b => b.text);
return {boxes: boxes.length, overlaps: overlaps.slice(0, 10), cut: cut.slice(0, 10),
        scrollWidth: document.documentElement.scrollWidth, width: width};
"""

#: Every verdict badge: its word and whether it lies inside the viewport's width.
VERDICTS_JS = """
const width = document.documentElement.clientWidth;
return [...document.querySelectorAll('.tree .verdict')].map(e => {
  const r = e.getBoundingClientRect();
  return {text: e.textContent, visible: e.checkVisibility() && r.width > 0,
          inside: r.left >= 0 && r.right <= width};
});
"""


def _browser() -> Any:
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
        "--hide-scrollbars",
        f"--window-size={WIDE},{HEIGHT}",
    ):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    return webdriver.Chrome(options=options, service=service)


@pytest.fixture
def browser() -> Iterator[Any]:
    b = _browser()
    try:
        yield b
    finally:
        b.quit()


def viewport(browser: Any, width: int) -> None:
    """An exact CSS viewport of `width` x HEIGHT (the window's chrome does not count)."""
    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False},
    )


def screenshot(browser: Any, name: str, whole: bool = False) -> None:
    """The first screen (the viewport), or with `whole` the whole page."""
    ARTIFACTS.mkdir(exist_ok=True)
    if not whole:
        browser.save_screenshot(str(ARTIFACTS / name))
        return
    width, height = browser.execute_script(
        "return [document.documentElement.clientWidth, document.documentElement.scrollHeight]"
    )
    shot = browser.execute_cdp_cmd(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
        },
    )
    (ARTIFACTS / name).write_bytes(base64.b64decode(shot["data"]))


def vfio(tmp_path: Path, id_: str, n: int, bus: str | None = None) -> list[str]:
    """`-device vfio-pci` for an emulated host device 0000:nn:00.0 in IOMMU group n."""
    sysfs = create_sysfs_device(tmp_path / f"{id_}-dev", VfioDeviceSpec(f"0000:{n:02x}:00.0", n))
    on = f",bus={bus}" if bus else ""
    return ["-device", f"vfio-pci,id={id_}{on},sysfsdev={sysfs},rombar=0"]


MISBOUND_ID = "nvidia-a100-passthrough-gpu-7"


def large_vm_args(tmp_path: Path) -> list[str]:
    """A q35 VM with 70 PCI devices: 18 root ports, three bridge levels, long ids, a
    vIOMMU without id (labelled by its QOM path), five vfio devices. The one at 1e.0 is
    given before the vIOMMU (MISBOUND, row 67 of the tree); the one behind the bridges
    shares an address space with the legacy devices there (QG004, a warning)."""
    args = ["-S", "-M", "q35,kernel-irqchip=split", "-m", "64"]

    def dev(spec: str) -> None:
        args.extend(["-device", spec])

    dev(f"pcie-root-port,id=pcie-root-port-for-{MISBOUND_ID},chassis=30,addr=1e.0")
    args += vfio(tmp_path, MISBOUND_ID, 7, f"pcie-root-port-for-{MISBOUND_ID}")
    dev("intel-iommu,caching-mode=on")  # no id
    for i in range(3):
        rp = f"pcie-root-port-for-nvidia-a100-passthrough-gpu-{i}"
        dev(f"pcie-root-port,id={rp},chassis={i + 1},addr={i + 2:x}.0")
        args += vfio(tmp_path, f"nvidia-a100-passthrough-gpu-{i}", i + 1, rp)
    for i in range(13):
        dev(f"pcie-root-port,id=rp{i + 5},chassis={i + 5},addr={i + 5:x}.0")
        dev(f"e1000e,id=nic-{i:02d}-on-a-root-port-with-a-long-name,bus=rp{i + 5},romfile=")
    dev("pcie-root-port,id=rp-to-the-legacy-bridges,chassis=20,addr=12.0")
    dev("pcie-pci-bridge,id=pcie-to-pci-bridge-level-1,bus=rp-to-the-legacy-bridges")
    dev("pci-bridge,id=pci-bridge-level-2,chassis_nr=21,bus=pcie-to-pci-bridge-level-1,addr=1.0")
    dev("pci-bridge,id=pci-bridge-level-3,chassis_nr=22,bus=pci-bridge-level-2,addr=1.0")
    for i in range(5):
        dev(f"pci-testdev,id=legacy-device-{i}-behind-three-bridges,bus=pci-bridge-level-3")
    args += vfio(tmp_path, "mellanox-connectx6-passthrough-nic-0", 9, "pci-bridge-level-3")
    for slot in range(3):
        for fn in range(6 if slot == 2 else 8):
            multi = ",multifunction=on" if fn == 0 else ""
            dev(f"pci-testdev,id=root-complex-device-{slot}-{fn},addr={0x13 + slot:x}.{fn}{multi}")
    return args


def test_large_vm_page(
    qemu_vm: VmFactory,
    daemon: Callable[..., Daemon],
    tmp_path: Path,
    fakevfio: Path,
    browser: Any,
) -> None:
    from selenium.webdriver.common.by import By

    vm = qemu_vm(
        *large_vm_args(tmp_path),
        name="large70",
        env=emulation_env(fakevfio, tmp_path / "large70.dma"),
    )
    name = f"unix:{vm.qmp_path}"
    d = daemon("--watch", str(tmp_path / "*.qmp"), "--interval", "30")
    wait_for(lambda: d.vms().get(name, {}).get("status") == "ok", what="inspection")
    doc = d.vm(name)
    assert len(doc["devices"]) == 70
    bad = [dev for dev in doc["devices"] if dev["verdict"] == "misbound"]
    assert [dev["id"] for dev in bad] == [MISBOUND_ID]
    assert any(v["path"].startswith("/machine/peripheral-anon/") for v in doc["viommus"])

    browser.get(f"http://127.0.0.1:{d.port}/")
    browser.find_element(By.LINK_TEXT, "large70").click()  # linked from the status page
    assert browser.current_url.endswith(f"/vms/{quote(name, safe='')}")
    for width in (WIDE, NARROW):
        viewport(browser, width)
        browser.get(browser.current_url.split("#")[0])
        banner = browser.find_element(By.CSS_SELECTOR, "section.banner")
        assert banner.text.startswith("CRITICAL"), banner.text
        link = banner.find_element(By.PARTIAL_LINK_TEXT, "in the picture")
        assert MISBOUND_ID in link.find_element(By.XPATH, "..").text
        rect = browser.execute_script("return arguments[0].getBoundingClientRect()", link)
        assert rect["top"] >= 0 and rect["bottom"] <= HEIGHT, rect  # on the first screen
        target = link.get_attribute("href").split("#", 1)[1]
        row = browser.find_element(By.ID, target)
        assert row.text.startswith(f"MISBOUND (QG001)\n{MISBOUND_ID}"), row.text
        evidence = banner.find_element(By.PARTIAL_LINK_TEXT, "evidence and fix")
        ev = browser.find_element(By.ID, evidence.get_attribute("href").split("#", 1)[1])
        assert "cmdline: before" in ev.text and "Fix:" in ev.text
        screenshot(browser, f"vm-page-70-devices-{width}.png")

        verdicts = browser.execute_script(VERDICTS_JS)  # one per vfio device, none folded
        words = sorted(v["text"].split(" ")[0] for v in verdicts)
        assert words == ["MISBOUND", "ok", "ok", "ok", "ok"], verdicts
        assert all(v["visible"] and v["inside"] for v in verdicts), verdicts
        for state in ("folded", "opened"):
            if state == "opened":
                browser.execute_script(
                    "document.querySelectorAll('details').forEach(d => d.open = true)"
                )
            boxes = browser.execute_script(TEXT_BOXES_JS)
            assert boxes["boxes"] > 200, boxes
            assert boxes["overlaps"] == [], (width, state, boxes)
            assert boxes["cut"] == [], (width, state, boxes)
            assert boxes["scrollWidth"] <= boxes["width"], (width, state, boxes)
        screenshot(browser, f"vm-page-70-devices-{width}-opened.png", whole=True)

        link = browser.find_element(By.CSS_SELECTOR, "section.banner").find_element(
            By.PARTIAL_LINK_TEXT, "in the picture"
        )
        link.click()
        top = browser.execute_script(
            "return document.getElementById(arguments[0]).getBoundingClientRect().top", target
        )
        assert -1 <= top < HEIGHT, top  # the anchor brought the device into view
        screenshot(browser, f"vm-page-70-devices-{width}-misbound.png")


def fleet_args(tmp_path: Path, kind: str, label: str) -> list[str]:
    """The command line of one small VM of the status-page fleet."""
    base = ["-S", "-M", "q35,kernel-irqchip=split", "-m", "32", "-name", f"guest={label}"]
    iommu = ["-device", "intel-iommu,id=viommu,caching-mode=on"]
    if kind == "critical":  # the vfio device realized before the vIOMMU
        return [*base, *vfio(tmp_path / label, "hostdev0", 1), *iommu]
    if kind == "vfio-ok":
        return [*base, *iommu, *vfio(tmp_path / label, "hostdev0", 1)]
    if kind == "warning":  # virtio behind the vIOMMU with iommu_platform=off: QG005
        return [*base, *iommu, "-device", "virtio-rng-pci,id=rng0"]
    return [*base, *iommu]  # no vfio device; unknown: the same, its monitor held


#: (kind, how many, name prefix): alphabetically the critical ones would come last.
FLEET = (
    ("no-vfio", 18, "app-server"),
    ("warning", 5, "cache"),
    ("unknown", 4, "db"),
    ("vfio-ok", 15, "gpu-worker"),
    ("critical", 8, "web-frontend"),
)


class MonitorHolder:
    """Another client holding the only monitor of some VMs (so they are busy: unknown)."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        self.ready = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._hold()), daemon=True)

    async def _hold(self) -> None:
        clients = []
        for path in self.paths:
            client = QMPClient("holder")
            await client.connect(str(path))
            clients.append(client)
        self.ready.set()
        while not self.stop.is_set():
            await asyncio.sleep(0.05)
        for client in clients:
            await client.disconnect()

    def __enter__(self) -> MonitorHolder:
        self.thread.start()
        assert self.ready.wait(10), "could not hold the monitors"
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)


def test_status_page_50_vms(
    qemu_vm: VmFactory,
    daemon: Callable[..., Daemon],
    tmp_path: Path,
    fakevfio: Path,
    browser: Any,
) -> None:
    from selenium.webdriver.common.by import By

    started = time.monotonic()
    vms: dict[str, list[QemuProcess]] = {}
    for kind, count, prefix in FLEET:
        for i in range(count):
            label = f"{prefix}-{i + 1:02d}"
            if kind == "critical" and i == count - 1:
                label = f"{prefix}-with-a-rather-long-libvirt-domain-name-{i + 1:02d}"
            env = None
            if kind in ("critical", "vfio-ok"):
                env = emulation_env(fakevfio, tmp_path / f"{label}.dma")
            vm = qemu_vm(*fleet_args(tmp_path, kind, label), name=f"{kind}-{i:02d}", env=env)
            vms.setdefault(kind, []).append(vm)
    assert sum(len(v) for v in vms.values()) == 50
    with MonitorHolder([vm.qmp_path for vm in vms["unknown"]]):
        d = daemon("--watch", str(tmp_path / "*.qmp"), "--interval", "30")
        wait_for(
            lambda: len(v := d.vms()) == 50 and all(x["status"] != "pending" for x in v.values()),
            timeout=40,
            what="50 VMs inspected",
        )
        print(f"50 VMs started and inspected in {time.monotonic() - started:.1f} s")
        browser.get(f"http://127.0.0.1:{d.port}/")
        for width in (WIDE, NARROW):
            viewport(browser, width)
            browser.refresh()
            screenshot(browser, f"status-page-50-vms-{width}.png")
            summary = browser.find_element(By.ID, "summary").text
            for text in (
                "8 critical",
                "4 unknown or not inspected",
                "5 warning",
                "15 vfio devices, all ok",
                "18 no vfio device",
            ):
                assert text in summary, summary
            rows = browser.find_elements(By.CSS_SELECTOR, "table.vms tbody tr")
            states = [r.get_attribute("data-state") for r in rows]
            expected = ["critical"] * 8 + ["unknown"] * 4 + ["warning"] * 5
            assert states == [*expected, *["vfio-ok"] * 15, *["no-vfio"] * 18], states
            first = rows[0].find_element(By.CSS_SELECTOR, "a.vm-name").text
            assert first.startswith("web-frontend"), first
            assert "QG001" in rows[0].text and "MISBOUND" in rows[0].text
            assert str(tmp_path) in rows[0].text  # the socket, as detail
            assert "monitor" in rows[8].text or "busy" in rows[8].text, rows[8].text
            assert "no vfio device" in rows[-1].text and "ok" in rows[20].text
            if width == WIDE:  # every critical VM, named, with its reason, on the first screen
                bottom = browser.execute_script(
                    "return arguments[0].getBoundingClientRect().bottom", rows[7]
                )
                assert bottom <= HEIGHT, bottom
            boxes = browser.execute_script(TEXT_BOXES_JS)
            assert boxes["overlaps"] == [] and boxes["cut"] == [], boxes
            assert boxes["scrollWidth"] <= boxes["width"], boxes
        browser.find_element(By.PARTIAL_LINK_TEXT, "only the 17 with problems").click()
        assert browser.current_url.endswith("/?problems=1")
        rows = browser.find_elements(By.CSS_SELECTOR, "table.vms tbody tr")
        assert [r.get_attribute("data-state") for r in rows] == expected
        screenshot(browser, "status-page-50-vms-problems.png")
