// Package microvm runs untrusted tool code for a gateway inside a throw-away QEMU microVM on
// the gateway's own host: the Tier-2 path for hosts without Kubernetes pods.
//
// A gateway sends a Request over its profile's unix socket (Sockets). The Runner boots a
// microvm machine through Kata's govmm with the guest kernel and initramfs (our init, package
// guest, and busybox) of hack/microvm-guest.sh plus a per-run job archive, with no network, no disk and no shared
// folder; QEMU runs as an unprivileged user under its seccomp sandbox. The guest's /init runs
// the command as an unprivileged guest user and reports its output in nonce-tagged frames on
// the serial line, which the host reads with a hard byte cap. The host enforces the timeout:
// QMP quit first, then SIGKILL.
//
// With a pool (Config.PoolSize), VMs are booted ahead without a job and wait; a request claims
// one and its job goes over the serial line instead of into the initramfs. A VM serves one job
// and runs, from start to end, as a uid and gid no other VM uses meanwhile (Config.IDs).
package microvm

import (
	"bytes"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/cavaliergopher/cpio"
)

// Limits on a request. They bound what the agent holds in memory per connection and what the
// job archive adds to the guest's RAM.
const (
	MaxArgs         = 256
	MaxCommandBytes = 64 << 10
	MaxStdinBytes   = 1 << 20
	DefaultTimeout  = 60 * time.Second
	MaxTimeout      = 10 * time.Minute
)

// Request is one execution a gateway asks for.
type Request struct {
	// Command is the argv run in the guest; Command[0] is looked up in the guest's PATH
	// (busybox applets: sh, awk, sed, ...).
	Command []string `json:"command"`
	// Stdin is fed to the command (base64 in JSON); at most MaxStdinBytes.
	Stdin []byte `json:"stdin,omitempty"`
	// TimeoutSeconds bounds the whole run, boot included. 0 means DefaultTimeout.
	TimeoutSeconds int `json:"timeoutSeconds,omitempty"`
}

// Phase is how a run ended; the same words as a ToolRun's phase.
type Phase string

// Phases.
const (
	Succeeded Phase = "Succeeded"
	Failed    Phase = "Failed"
	TimedOut  Phase = "TimedOut"
	Rejected  Phase = "Rejected"
	// Error means the microVM itself failed (QEMU did not start, the guest broke its protocol).
	Error Phase = "Error"
)

// Route is where a run was executed.
type Route string

// Routes.
const (
	// RouteHost is a microVM booted by the node agent on the gateway's own host.
	RouteHost Route = "Host"
	// RouteCluster is a ToolRun the node agent created in the cluster on the profile's behalf.
	RouteCluster Route = "Cluster"
)

// Start says whether a host-local run got a pre-booted VM from the warm pool or booted one.
type Start string

// Starts.
const (
	StartWarm Start = "Warm"
	StartCold Start = "Cold"
)

// Result is what comes back from a run.
type Result struct {
	Phase    Phase `json:"phase"`
	ExitCode int   `json:"exitCode"`
	// Stdout and Stderr are the first OutputCap bytes of each stream (base64 in JSON).
	Stdout          []byte `json:"stdout,omitempty"`
	Stderr          []byte `json:"stderr,omitempty"`
	StdoutTruncated bool   `json:"stdoutTruncated,omitempty"`
	StderrTruncated bool   `json:"stderrTruncated,omitempty"`
	// Message explains a phase other than Succeeded/Failed.
	Message string `json:"message,omitempty"`
	// DurationMillis is the wall time from the request to the VM's end.
	DurationMillis int64 `json:"durationMillis"`
	// Route is where the run was executed; empty when it was refused before routing.
	Route Route `json:"route,omitempty"`
	// Start is Warm or Cold for a host-local run; ColdReason says why a run that could have
	// been warm was not (the pool was empty, or the profile held its share).
	Start      Start  `json:"start,omitempty"`
	ColdReason string `json:"coldReason,omitempty"`
}

// Validate refuses a request the guest cannot run as written or that exceeds the limits.
func (r Request) Validate() error {
	if len(r.Command) == 0 || r.Command[0] == "" {
		return errors.New("command is empty")
	}
	if len(r.Command) > MaxArgs {
		return fmt.Errorf("command has %d arguments, at most %d are allowed", len(r.Command), MaxArgs)
	}
	total := 0
	for i, a := range r.Command {
		if strings.IndexByte(a, 0) >= 0 {
			return fmt.Errorf("argument %d contains a NUL byte", i)
		}
		total += len(a)
	}
	if total > MaxCommandBytes {
		return fmt.Errorf("command is %d bytes, at most %d are allowed", total, MaxCommandBytes)
	}
	if len(r.Stdin) > MaxStdinBytes {
		return fmt.Errorf("stdin is %d bytes, at most %d are allowed", len(r.Stdin), MaxStdinBytes)
	}
	if r.TimeoutSeconds < 0 || time.Duration(r.TimeoutSeconds)*time.Second > MaxTimeout {
		return fmt.Errorf("timeoutSeconds %d is outside 0..%d", r.TimeoutSeconds, int(MaxTimeout/time.Second))
	}
	return nil
}

// Timeout is the request's time limit.
func (r Request) Timeout() time.Duration {
	if r.TimeoutSeconds == 0 {
		return DefaultTimeout
	}
	return time.Duration(r.TimeoutSeconds) * time.Second
}

// shellQuote quotes one word for the guest's sh: single quotes keep everything literal, and a
// single quote itself is closed, escaped and reopened.
func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// script is the guest's /job/cmd: exec of the argv, every word quoted.
func script(argv []string) []byte {
	var b strings.Builder
	b.WriteString("exec")
	for _, a := range argv {
		b.WriteByte(' ')
		b.WriteString(shellQuote(a))
	}
	b.WriteByte('\n')
	return []byte(b.String())
}

// JobArchive is the newc cpio archive the Runner appends to the guest's initramfs (the kernel
// unpacks concatenated archives into the same root, so the job needs no kernel command line).
// It is exported for booting the guest by hand: benchmarks and debugging.
func JobArchive(req Request, nonce string, outputCap int) ([]byte, error) {
	var buf bytes.Buffer
	w := cpio.NewWriter(&buf)
	entries := []struct {
		name string
		mode cpio.FileMode
		data []byte
	}{
		{"job", cpio.TypeDir | 0o700, nil},
		{"job/cmd", cpio.TypeReg | 0o400, script(req.Command)},
		{"job/stdin", cpio.TypeReg | 0o400, req.Stdin},
		{"job/cap", cpio.TypeReg | 0o400, []byte(strconv.Itoa(outputCap) + "\n")},
		{"job/nonce", cpio.TypeReg | 0o400, []byte(nonce + "\n")},
	}
	for _, e := range entries {
		hdr := &cpio.Header{Name: e.name, Mode: e.mode, Size: int64(len(e.data)), Links: 1}
		if e.mode&cpio.TypeDir != 0 {
			hdr.Links = 2
		}
		if err := w.WriteHeader(hdr); err != nil {
			return nil, err
		}
		if _, err := w.Write(e.data); err != nil {
			return nil, err
		}
	}
	if err := w.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}
