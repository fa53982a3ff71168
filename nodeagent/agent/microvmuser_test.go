package agent

import "testing"

// TestCheckMicroVMUser: QEMU never runs as a user a gateway could be given.
func TestCheckMicroVMUser(t *testing.T) {
	for _, name := range []string{DefaultMicroVMUser, "qemu-tools", "agent-Vm", "microvm"} {
		if err := checkMicroVMUser(name); err != nil {
			t.Errorf("checkMicroVMUser(%q): %v", name, err)
		}
	}
	for _, name := range []string{"agent", "agent-core", "agent-microvm2", "agent-vm"} {
		if err := checkMicroVMUser(name); err == nil {
			t.Errorf("checkMicroVMUser(%q) accepted a user a gateway can run as", name)
		}
	}
}
