"""Built-in demo: real QEMU VMs with emulated vfio-pci devices."""
