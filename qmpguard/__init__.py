"""qmpguard: find vfio-pci devices whose DMA bypasses the guest's vIOMMU."""

__version__ = "0.1.0"
