package cli

import (
	"strings"
	"testing"
)

func TestLintPythonPath(t *testing.T) {
	env := "AGENT_ROOT=\"/x\"\nPYTHONPATH=\"/x\"\n"
	if got := lintPythonPath("[Service]\n# PYTHONPATH is never set here\n", "[Service]\n", env); len(got) != 0 {
		t.Errorf("clean files: %v", got)
	}
	got := lintPythonPath("[Service]\nEnvironment=PYTHONPATH=/tmp\n", "[Service]\nPassEnvironment=PYTHONPATH\n", env+"PYTHONPATH=\"/y\"\n")
	if len(got) != 3 || !strings.Contains(got[2], "2 times") {
		t.Errorf("dirty files: %v", got)
	}
}
