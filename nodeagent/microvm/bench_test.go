package microvm_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr"

	"github.com/agent-gateway/gateway-operator/nodeagent/microvm"
	"github.com/agent-gateway/gateway-operator/test/microvmguest"
	"github.com/agent-gateway/gateway-operator/test/poll"
	"github.com/agent-gateway/gateway-operator/test/systemdhost"
)

// BenchmarkMicroVMRoundTrip measures a tool run as a gateway sees it (connect to its socket,
// send the request, the reply comes back), under TCG, in one run:
//   - cold: the agent has systemd start a microVM in a transient unit, as an unprivileged user
//     under seccomp, with the job in its initramfs; beside it a bare qemu-system-x86_64 boot, as
//     root and without QMP, of the same kernel, initramfs and job, until the guest powers off;
//   - warm: a VM of the pool (booted before, waiting for its job) takes the job on its serial
//     line; one request at a time with the pool full, then 4 at once from 4 profiles;
//   - the resident memory of an idle warm VM's QEMU, and the agent's heap per idle warm VM.
//
// The goal for warm runs is claim to first output p50 <= 50 ms, p95 <= 150 ms: a reply carries
// the first output, so the round trip bounds it from above.
func BenchmarkMicroVMRoundTrip(b *testing.B) {
	const runs, concurrent = 20, 4
	kernel, initramfs := microvmguest.Files(b)
	req := microvm.Request{Command: []string{"sh", "-c", "echo hello"}}

	cold := microvmguest.Runner(b, microvm.Config{Log: logr.Discard()})
	coldSocket := benchSockets(b, coldExecutor{cold}, 1)[0]
	bare := bareBoot(b, cold, kernel, initramfs, req)

	firsts := &firstOutputs{}
	warm, h := microvmguest.Start(b, microvm.Config{Log: logr.New(firsts), PoolSize: concurrent, MaxConcurrent: concurrent})
	warmSockets := benchSockets(b, warm, concurrent)
	full := func() {
		poll.Until(b, "a full pool", 2*time.Minute, func() (bool, string) { return warm.Warm() == concurrent, strconv.Itoa(warm.Warm()) })
	}

	for i := 0; i < b.N; i++ {
		var colds, bares, warms, parallel []time.Duration
		for range runs {
			colds = append(colds, roundTrip(b, coldSocket, req, microvm.StartCold))
			bares = append(bares, bare())
		}
		firsts.reset()
		for range runs {
			full()
			warms = append(warms, roundTrip(b, warmSockets[0], req, microvm.StartWarm))
		}
		claims := firsts.reset()
		for range runs / concurrent {
			full()
			var mu sync.Mutex
			var wg sync.WaitGroup
			for _, s := range warmSockets {
				wg.Add(1)
				go func() {
					defer wg.Done()
					d := roundTrip(b, s, req, microvm.StartWarm)
					mu.Lock()
					parallel = append(parallel, d)
					mu.Unlock()
				}()
			}
			wg.Wait()
		}
		full()
		rss := idleRSS(b, h)
		heapFull := heapInUse()
		warm.Close()
		heapPerVM := (float64(heapFull) - float64(heapInUse())) / concurrent / 1024

		report := func(name string, d []time.Duration) (float64, float64) {
			p50, p95 := percentiles(d)
			b.ReportMetric(millis(p50), name+"-p50-ms")
			b.ReportMetric(millis(p95), name+"-p95-ms")
			return millis(p50), millis(p95)
		}
		c50, c95 := report("cold", colds)
		b50, b95 := report("bare-boot", bares)
		w50, w95 := report("warm", warms)
		f50, f95 := report("warm-claim-to-first-output", claims)
		p50, p95 := report("warm-x4", parallel)
		b.ReportMetric(rss, "idle-warm-vm-rss-MiB")
		b.ReportMetric(heapPerVM, "agent-heap-per-idle-vm-KiB")
		verdict := func(p50, p95 float64) string {
			if p50 <= 50 && p95 <= 150 {
				return "met"
			}
			return "missed"
		}
		fmt.Printf("microVM under %s, %d runs each, round trip through the socket:\n"+
			"  cold        p50 %6.0f ms  p95 %6.0f ms   (bare qemu boot p50 %.0f ms p95 %.0f ms)\n"+
			"  warm        p50 %6.0f ms  p95 %6.0f ms   %.0fx faster than cold at p50\n"+
			"  warm, claim to first output  p50 %3.0f ms  p95 %3.0f ms   goal p50<=50 p95<=150: %s\n"+
			"  warm, x%d    p50 %6.0f ms  p95 %6.0f ms   goal: %s\n"+
			"  idle warm VM: QEMU RSS %.0f MiB; agent heap %+.1f KiB per idle VM\n",
			cold.Accel(), runs, c50, c95, b50, b95, w50, w95, c50/w50, f50, f95, verdict(f50, f95), concurrent, p50, p95, verdict(p50, p95), rss, heapPerVM)
	}
}

// firstOutputs collects, from the runner's debug log, the time from claiming a warm VM to the
// first byte of its report.
type firstOutputs struct {
	mu sync.Mutex
	d  []time.Duration
}

func (f *firstOutputs) reset() []time.Duration {
	f.mu.Lock()
	defer f.mu.Unlock()
	d := f.d
	f.d = nil
	return d
}

func (f *firstOutputs) Init(logr.RuntimeInfo)          {}
func (f *firstOutputs) Enabled(level int) bool         { return level <= 1 }
func (f *firstOutputs) Error(error, string, ...any)    {}
func (f *firstOutputs) WithValues(...any) logr.LogSink { return f }
func (f *firstOutputs) WithName(string) logr.LogSink   { return f }
func (f *firstOutputs) Info(_ int, msg string, kv ...any) {
	if msg != "tool run reported" {
		return
	}
	for i := 0; i+1 < len(kv); i += 2 {
		if ms, ok := kv[i+1].(float64); ok && kv[i] == "firstOutputMillis" {
			f.mu.Lock()
			f.d = append(f.d, time.Duration(ms*float64(time.Millisecond)))
			f.mu.Unlock()
		}
	}
}

// coldExecutor boots a VM for every request: the cold path through the same socket.
type coldExecutor struct{ r *microvm.Runner }

func (c coldExecutor) Execute(ctx context.Context, _ string, req microvm.Request) (microvm.Result, error) {
	res, err := c.r.Run(ctx, req)
	res.Start = microvm.StartCold
	return res, err
}

// benchSockets serves n profiles' sockets with e and returns their paths.
func benchSockets(b *testing.B, e microvm.Executor, n int) []string {
	s := &microvm.Sockets{Executor: e, Log: logr.Discard()}
	b.Cleanup(s.Close)
	var paths []string
	for i := range n {
		home := b.TempDir()
		if err := s.Ensure("bench"+strconv.Itoa(i), home, microvm.Owner{UID: os.Getuid(), GID: os.Getgid()}); err != nil {
			b.Fatal(err)
		}
		paths = append(paths, filepath.Join(home, "run", microvm.SocketName))
	}
	return paths
}

// roundTrip sends req on socket and checks the reply and how its VM started.
func roundTrip(b *testing.B, socket string, req microvm.Request, want microvm.Start) time.Duration {
	start := time.Now()
	conn, err := net.Dial("unix", socket)
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	if err := json.NewEncoder(conn).Encode(req); err != nil {
		b.Fatal(err)
	}
	var res microvm.Result
	if err := json.NewDecoder(conn).Decode(&res); err != nil {
		b.Error(err)
		return 0
	}
	if res.Phase != microvm.Succeeded || string(res.Stdout) != "hello\n" || res.Start != want {
		b.Errorf("round trip: %+v, want a %s run", res, want)
	}
	return time.Since(start)
}

// bareBoot returns a function that boots the same kernel, initramfs and job with a bare QEMU.
func bareBoot(b *testing.B, r *microvm.Runner, kernel, initramfs string, req microvm.Request) func() time.Duration {
	base, err := os.ReadFile(initramfs)
	if err != nil {
		b.Fatal(err)
	}
	job, err := microvm.JobArchive(req, "0123456789abcdef0123456789abcdef", microvm.DefaultOutputCap)
	if err != nil {
		b.Fatal(err)
	}
	initrd := filepath.Join(b.TempDir(), "initrd")
	image := append(append(base, make([]byte, (4-len(base)%4)%4)...), job...)
	if err := os.WriteFile(initrd, image, 0o600); err != nil {
		b.Fatal(err)
	}
	return func() time.Duration {
		start := time.Now()
		cmd := exec.Command("qemu-system-x86_64", "-machine", "microvm,accel=tcg", "-nodefaults", "-no-user-config",
			"-nographic", "-m", "128M", "-smp", "1", "-no-reboot", "-kernel", kernel, "-initrd", initrd,
			"-append", r.KernelArgs(), "-serial", "stdio")
		out, err := cmd.Output()
		if err != nil || !bytes.Contains(out, []byte(" end")) {
			b.Fatalf("bare boot: %v\n%s", err, out)
		}
		return time.Since(start)
	}
}

// idleRSS is the mean resident memory, in MiB, of the QEMUs of h's tool-run units.
func idleRSS(b *testing.B, h *systemdhost.Host) float64 {
	units, err := h.Dial(b).RunningInstances(context.Background(), microvm.UnitPrefix+"*.service")
	if err != nil || len(units) == 0 {
		b.Fatalf("tool-run units: %v %v", units, err)
	}
	var kib float64
	for _, pid := range units {
		fields := procStatus(b, h.ProcPath(pid, "status"))
		v, err := strconv.ParseFloat(strings.TrimSuffix(fields["VmRSS"], " kB"), 64)
		if err != nil {
			b.Fatalf("VmRSS of %d: %q", pid, fields["VmRSS"])
		}
		kib += v
	}
	return kib / float64(len(units)) / 1024
}

// heapInUse is the process's heap and goroutine stacks after a collection.
func heapInUse() uint64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapInuse + m.StackInuse
}

// percentiles returns the nearest-rank p50 and p95.
func percentiles(d []time.Duration) (p50, p95 time.Duration) {
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	rank := func(p float64) time.Duration {
		i := int(p*float64(len(s))+0.999999) - 1
		return s[max(0, min(i, len(s)-1))]
	}
	return rank(0.50), rank(0.95)
}

func millis(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
