package microvm_test

import (
	"bytes"
	"context"
	"crypto/md5" //nolint:gosec // a checksum of test data, not security
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/agent-gateway/gateway-operator/nodeagent/microvm"
	"github.com/agent-gateway/gateway-operator/nodeagent/systemd"
	"github.com/agent-gateway/gateway-operator/test/microvmguest"
	"github.com/agent-gateway/gateway-operator/test/poll"
	"github.com/agent-gateway/gateway-operator/test/systemdhost"
)

// waitWarm waits until r's pool holds n VMs that announced themselves ready.
func waitWarm(t *testing.T, r *microvm.Runner, n int) {
	t.Helper()
	poll.Until(t, fmt.Sprintf("%d warm microVMs", n), 2*time.Minute, func() (bool, string) {
		return r.Warm() >= n, fmt.Sprintf("%d warm", r.Warm())
	})
}

// execute runs req for profile through the Executor and checks it started as want.
func execute(t *testing.T, r *microvm.Runner, profile string, want microvm.Start, req microvm.Request) microvm.Result {
	t.Helper()
	res, err := r.Execute(context.Background(), profile, req)
	if err != nil {
		t.Fatalf("execute %q: %v (%+v)", req.Command, err, res)
	}
	t.Logf("%s %q -> %s %s exit %d in %d ms %s", profile, req.Command, res.Start, res.Phase, res.ExitCode, res.DurationMillis, res.ColdReason)
	if res.Start != want || res.Route != microvm.RouteHost {
		t.Fatalf("%s run started %s via %s (%s), want %s via Host", profile, res.Start, res.Route, res.ColdReason, want)
	}
	return res
}

// vmUnits returns the tool-run units running on h (whose systemd sd is) with the uid each QEMU
// runs as.
func vmUnits(t *testing.T, h *systemdhost.Host, sd *systemd.Conn) map[string]string {
	t.Helper()
	units, err := sd.RunningInstances(context.Background(), microvm.UnitPrefix+"*.service")
	if err != nil {
		t.Fatal(err)
	}
	uids := map[string]string{}
	for u, pid := range units {
		uid := ""
		if pid != 0 {
			uid, _, _ = strings.Cut(procStatus(t, h.ProcPath(pid, "status"))["Uid"], " ")
		}
		uids[u] = uid
	}
	return uids
}

// onlyUnit returns the one tool-run unit on h and its QEMU's uid.
func onlyUnit(t *testing.T, h *systemdhost.Host, sd *systemd.Conn) (string, string) {
	t.Helper()
	units := vmUnits(t, h, sd)
	if len(units) != 1 {
		t.Fatalf("tool-run units %v, want exactly one", units)
	}
	for u, uid := range units {
		return u, uid
	}
	return "", ""
}

// TestWarmVMIsNeverReused: a warm VM serves one job. What a job leaves in the guest's RAM is
// not there for the next job, which runs in another unit as another uid; the job's stdin
// arrives over the serial line byte for byte.
func TestWarmVMIsNeverReused(t *testing.T) {
	r, h := microvmguest.Start(t, microvm.Config{PoolSize: 1})
	sd := h.Dial(t)
	waitWarm(t, r, 1)
	unit1, uid1 := onlyUnit(t, h, sd)
	stdin := make([]byte, 256)
	for i := range stdin {
		stdin[i] = byte(i)
	}
	res := execute(t, r, "a", microvm.StartWarm, microvm.Request{
		Command: []string{"sh", "-c", `echo mine >/tmp/work/marker; echo left >/dev/shm/marker 2>/dev/null; cat`},
		Stdin:   stdin,
	})
	if res.Phase != microvm.Succeeded || !bytes.Equal(res.Stdout, stdin) {
		t.Fatalf("first run: %s %q, want every byte value back (%s)", res.Phase, res.Stdout, res.Message)
	}
	waitWarm(t, r, 1)
	unit2, uid2 := onlyUnit(t, h, sd)
	res = execute(t, r, "a", microvm.StartWarm, microvm.Request{
		Command: []string{"sh", "-c", `cat /tmp/work/marker /dev/shm/marker 2>/dev/null || echo fresh`},
	})
	if res.Phase != microvm.Succeeded || string(res.Stdout) != "fresh\n" {
		t.Fatalf("second run saw %q (%s), want a fresh guest", res.Stdout, res.Message)
	}
	if unit1 == unit2 || uid1 == uid2 || uid1 == "" || uid2 == "" {
		t.Fatalf("the two warm VMs were %s (uid %s) and %s (uid %s): want two units and two uids", unit1, uid1, unit2, uid2)
	}
	poll.Until(t, "the first VM's unit is gone", 20*time.Second, func() (bool, string) {
		_, ok := vmUnits(t, h, sd)[unit1]
		return !ok, unit1
	})
}

// TestWarmVMTakesALargeJob: 12 KiB of random stdin reach a warm guest intact over its serial
// line; the largest stdin a request may carry goes to a cold VM, which says why.
func TestWarmVMTakesALargeJob(t *testing.T) {
	r, _ := microvmguest.Start(t, microvm.Config{PoolSize: 1})
	for _, tc := range []struct {
		size  int
		start microvm.Start
	}{{12 << 10, microvm.StartWarm}, {microvm.MaxStdinBytes, microvm.StartCold}} {
		stdin := make([]byte, tc.size)
		if _, err := rand.Read(stdin); err != nil {
			t.Fatal(err)
		}
		sum := md5.Sum(stdin) //nolint:gosec // a checksum of test data
		waitWarm(t, r, 1)
		res := execute(t, r, "a", tc.start, microvm.Request{Command: []string{"md5sum"}, Stdin: stdin})
		if want := hex.EncodeToString(sum[:]) + "  -\n"; res.Phase != microvm.Succeeded || string(res.Stdout) != want {
			t.Fatalf("md5sum of %d bytes: %s %q (%s), want %q", len(stdin), res.Phase, res.Stdout, res.Message, want)
		}
		if tc.start == microvm.StartCold && !strings.Contains(res.ColdReason, "serial line") {
			t.Errorf("a large job booted cold with the reason %q", res.ColdReason)
		}
	}
}

// TestWarmPoolShare: a profile holding its share of warm VMs boots cold, and that does not keep
// another profile from a warm VM. The VMs that exist at once run as distinct uids.
func TestWarmPoolShare(t *testing.T) {
	r, h := microvmguest.Start(t, microvm.Config{PoolSize: 2, PoolShare: 1, MaxConcurrent: 3})
	sd := h.Dial(t)
	waitWarm(t, r, 2)
	var wg sync.WaitGroup
	defer wg.Wait()
	// a's first run holds its VM until the test has seen the others.
	ctx, release := context.WithCancel(context.Background())
	defer release()
	wg.Add(1)
	go func() {
		defer wg.Done()
		res, _ := r.Execute(ctx, "a", microvm.Request{Command: []string{"sh", "-c", "sleep 600"}, TimeoutSeconds: 120})
		if res.Start != microvm.StartWarm {
			t.Errorf("a's first run: %+v, want warm", res)
		}
	}()
	poll.Until(t, "a holds a warm VM", 30*time.Second, func() (bool, string) { return r.Warm() == 1, fmt.Sprint(r.Warm()) })
	res := execute(t, r, "a", microvm.StartCold, microvm.Request{Command: []string{"true"}})
	if res.Phase != microvm.Succeeded || !strings.Contains(res.ColdReason, "share") {
		t.Fatalf("a's second run: %+v, want Succeeded cold because of a's share", res)
	}
	waitWarm(t, r, 1)
	done := make(chan microvm.Result, 1)
	go func() {
		res, _ := r.Execute(context.Background(), "b", microvm.Request{Command: []string{"sh", "-c", "echo b; sleep 5"}})
		done <- res
	}()
	// a's VM and b's VM (and any refill) run at once, each as a uid of its own.
	poll.Until(t, "a's and b's VMs running", 30*time.Second, func() (bool, string) {
		units := vmUnits(t, h, sd)
		seen := map[string]bool{}
		for _, uid := range units {
			if uid == "" || seen[uid] {
				return false, fmt.Sprint(units)
			}
			seen[uid] = true
		}
		return len(units) >= 2 && r.Warm() == 0, fmt.Sprint(units)
	})
	if res := <-done; res.Start != microvm.StartWarm || res.Phase != microvm.Succeeded || string(res.Stdout) != "b\n" {
		t.Fatalf("b's run while a holds its share: %+v, want a warm Succeeded run", res)
	}
}

// TestWarmVMIsReplacedAfterMaxIdle: a VM nobody claims is replaced by a fresh one once it has
// waited MaxIdle, and its unit's RuntimeMaxSec leaves room for that wait plus the longest run.
func TestWarmVMIsReplacedAfterMaxIdle(t *testing.T) {
	const maxIdle = 4 * time.Second
	r, h := microvmguest.Start(t, microvm.Config{PoolSize: 1, MaxIdle: maxIdle})
	sd := h.Dial(t)
	waitWarm(t, r, 1)
	unit, _ := onlyUnit(t, h, sd)
	out, err := h.Systemctl(context.Background(), "show", unit, "-p", "RuntimeMaxUSec", "--value")
	if want := "11min 4s"; err != nil || strings.TrimSpace(string(out)) != want {
		t.Errorf("warm unit's RuntimeMaxUSec %q (%v), want %s (max idle + longest run + 1 min)", out, err, want)
	}
	poll.Until(t, "the idle VM replaced by a fresh one", time.Minute, func() (bool, string) {
		units := vmUnits(t, h, sd)
		_, old := units[unit]
		return !old && len(units) == 1 && r.Warm() == 1, fmt.Sprint(units)
	})
}
