"""Pure analysis over snapshots: topology, vIOMMUs, bindings, order evidence, findings."""
