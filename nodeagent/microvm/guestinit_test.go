package microvm_test

import (
	"strings"
	"testing"

	"github.com/agent-gateway/gateway-operator/nodeagent/microvm"
)

// The guest's init hands the command no privilege and nothing of the job but its stdin, and
// a process the command leaves behind, even one holding its stdout, does not outlive it.
func TestVMCommandGetsNoPrivilegeAndLeavesNothingBehind(t *testing.T) {
	for _, start := range starts {
		t.Run(string(start), func(t *testing.T) { testCommandGetsNoPrivilege(t, start) })
	}
}

func testCommandGetsNoPrivilege(t *testing.T, start microvm.Start) {
	r, _ := startRunner(t, start, microvm.Config{})
	probe := `
grep -E '^(Uid|Gid|Groups|NoNewPrivs|CapInh|CapPrm|CapEff|CapBnd|CapAmb):' /proc/self/status | tr -s '\t ' ' '
echo "sid-is-pid:$(test "$(cut -d' ' -f6 /proc/$$/stat)" = "$$" && echo yes || echo no)"
echo "job:$(ls /job 2>/dev/null | tr '\n' ' ')"
echo "stdin:$(cat)"
sleep 600 &
`
	res := runAs(t, r, start, microvm.Request{Command: []string{"sh", "-c", probe}, Stdin: []byte("the input"), TimeoutSeconds: 45})
	if res.Phase != microvm.Succeeded {
		t.Fatalf("probe: %+v", res)
	}
	got := map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(string(res.Stdout)), "\n") {
		k, v, _ := strings.Cut(line, ":")
		got[k] = strings.TrimSpace(v)
	}
	for k, want := range map[string]string{
		"Uid": "1000 1000 1000 1000", "Gid": "1000 1000 1000 1000", "Groups": "", "NoNewPrivs": "1",
		"CapInh": "0000000000000000", "CapPrm": "0000000000000000", "CapEff": "0000000000000000",
		"CapBnd": "0000000000000000", "CapAmb": "0000000000000000",
		"sid-is-pid": "yes", "job": "", "stdin": "the input",
	} {
		if got[k] != want {
			t.Errorf("guest %s = %q, want %q", k, got[k], want)
		}
	}
}
