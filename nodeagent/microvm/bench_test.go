package microvm_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"testing"
	"time"

	"github.com/go-logr/logr"

	"github.com/agent-gateway/gateway-operator/nodeagent/microvm"
	"github.com/agent-gateway/gateway-operator/test/microvmguest"
)

// BenchmarkMicroVMRoundTrip measures a tool run as a gateway sees it (connect to its socket,
// send the request, the agent has systemd start a microVM in a transient unit, as an
// unprivileged user under seccomp, the guest runs the command, the reply comes back) beside a bare qemu-system-x86_64 boot, as root and
// without QMP, of the same kernel, initramfs and job, run until the guest powers off.
// Ten of each per iteration, interleaved, under TCG.
func BenchmarkMicroVMRoundTrip(b *testing.B) {
	const runs = 10
	kernel, initramfs := microvmguest.Files(b)
	runner := microvmguest.Runner(b, microvm.Config{Log: logr.Discard()})
	home := b.TempDir()
	s := &microvm.Sockets{Executor: runner, Log: logr.Discard()}
	defer s.Close()
	if err := s.Ensure("bench", home, microvm.Owner{UID: os.Getuid(), GID: os.Getgid()}); err != nil {
		b.Fatal(err)
	}
	socket := filepath.Join(home, "run", microvm.SocketName)
	req := microvm.Request{Command: []string{"sh", "-c", "echo hello"}}

	// The bare boot's initrd: the same base plus the same job archive.
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
	bare := func() time.Duration {
		start := time.Now()
		cmd := exec.Command("qemu-system-x86_64", "-machine", "microvm,accel=tcg", "-nodefaults", "-no-user-config",
			"-nographic", "-m", "128M", "-smp", "1", "-no-reboot", "-kernel", kernel, "-initrd", initrd,
			"-append", runner.KernelArgs(), "-serial", "stdio")
		out, err := cmd.Output()
		if err != nil || !bytes.Contains(out, []byte(" end")) {
			b.Fatalf("bare boot: %v\n%s", err, out)
		}
		return time.Since(start)
	}
	roundTrip := func() time.Duration {
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
			b.Fatal(err)
		}
		if res.Phase != microvm.Succeeded || string(res.Stdout) != "hello\n" {
			b.Fatalf("round trip: %+v", res)
		}
		return time.Since(start)
	}

	for i := 0; i < b.N; i++ {
		var trips, bares []time.Duration
		for range runs {
			trips = append(trips, roundTrip())
			bares = append(bares, bare())
		}
		tp50, tp95 := percentiles(trips)
		bp50, bp95 := percentiles(bares)
		b.ReportMetric(ms(tp50), "roundtrip-p50-ms")
		b.ReportMetric(ms(tp95), "roundtrip-p95-ms")
		b.ReportMetric(ms(bp50), "bare-boot-p50-ms")
		b.ReportMetric(ms(bp95), "bare-boot-p95-ms")
		fmt.Printf("microVM under %s, %d runs each: round trip p50 %.0f ms p95 %.0f ms; bare qemu boot p50 %.0f ms p95 %.0f ms; overhead p50 %+.0f ms (%.2fx)\n",
			runner.Accel(), runs, ms(tp50), ms(tp95), ms(bp50), ms(bp95), ms(tp50-bp50), float64(tp50)/float64(bp50))
	}
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

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
