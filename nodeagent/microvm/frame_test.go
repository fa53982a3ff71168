package microvm

import (
	"bytes"
	"encoding/base64"
	"errors"
	"fmt"
	"os/exec"
	"strings"
	"testing"
)

const nonce = "0123456789abcdef0123456789abcdef"

// frame writes a report as the guest's /init does (guest.Report), with \r\n line ends as a
// tty with output processing makes them.
func frame(out, errOut []byte, code int) string {
	var b strings.Builder
	section := func(word string, data []byte) {
		fmt.Fprintf(&b, "%s %s %d\r\n", nonce, word, len(data))
		enc := base64.StdEncoding.EncodeToString(data)
		for len(enc) > 76 {
			b.WriteString(enc[:76] + "\r\n")
			enc = enc[76:]
		}
		if enc != "" {
			b.WriteString(enc + "\r\n")
		}
	}
	section("out", out)
	section("err", errOut)
	fmt.Fprintf(&b, "%s exit %d\r\n%s end\r\n", nonce, code, nonce)
	return b.String()
}

func TestReadReport(t *testing.T) {
	big := bytes.Repeat([]byte("x"), 101)
	cases := []struct {
		name    string
		serial  string
		cap     int
		want    Result
		wantErr string
	}{
		{name: "plain", serial: frame([]byte("hello\n"), []byte("oops\n"), 0), cap: 100,
			want: Result{Phase: Succeeded, Stdout: []byte("hello\n"), Stderr: []byte("oops\n")}},
		{name: "exit code", serial: frame(nil, nil, 42), cap: 100, want: Result{Phase: Failed, ExitCode: 42}},
		{name: "kernel noise and forged frames without the nonce are ignored",
			serial: "[    0.1] random kernel line\r\nfffff out 3\r\nZm9v\r\n" + frame([]byte("ok"), nil, 0) + "trailing\r\n", cap: 100,
			want: Result{Phase: Succeeded, Stdout: []byte("ok")}},
		{name: "cap+1 bytes means truncated", serial: frame(big, nil, 0), cap: 100,
			want: Result{Phase: Succeeded, Stdout: big[:100], StdoutTruncated: true}},
		{name: "more than cap+1 announced", serial: frame(append(big, 'y'), nil, 0), cap: 100, wantErr: "invalid out size"},
		{name: "more sent than announced", serial: nonce + " out 1\r\nZm9vYmFy\r\n", cap: 100, wantErr: "more output than it announced"},
		{name: "less sent than announced", serial: nonce + " out 5\r\nZm9v\r\n" + nonce + " exit 0\r\n", cap: 100, wantErr: "announced 5 bytes"},
		{name: "no exit code", serial: nonce + " end\r\n", cap: 100, wantErr: "without an exit code"},
		{name: "bad exit code", serial: nonce + " exit 300\r\n", cap: 100, wantErr: "invalid exit code"},
		{name: "unknown frame", serial: nonce + " shell rm -rf /\r\n", cap: 100, wantErr: "unknown frame"},
		{name: "guest went away", serial: nonce + " out 0\r\n", cap: 100, wantErr: "ended without reporting"},
		{name: "very long lines are skipped", serial: strings.Repeat("z", 3*maxLine) + "\r\n" + frame(nil, nil, 0), cap: 100,
			want: Result{Phase: Succeeded}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			rep, err := readReport(strings.NewReader(c.serial), nonce, c.cap, serialLimit(c.cap))
			if c.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), c.wantErr) {
					t.Fatalf("error %v, want one containing %q", err, c.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			got := rep.result(c.cap)
			if got.Phase != c.want.Phase || got.ExitCode != c.want.ExitCode || !bytes.Equal(got.Stdout, c.want.Stdout) ||
				!bytes.Equal(got.Stderr, c.want.Stderr) || got.StdoutTruncated != c.want.StdoutTruncated {
				t.Fatalf("got %+v, want %+v", got, c.want)
			}
		})
	}
}

func TestReadReportStopsAtTheSerialLimit(t *testing.T) {
	// A guest that never stops writing: the host reads at most the limit.
	flood := &countingReader{}
	_, err := readReport(flood, nonce, 1024, serialLimit(1024))
	if !errors.Is(err, errSerialLimit) {
		t.Fatalf("error %v, want the serial limit", err)
	}
	if flood.n > serialLimit(1024)+maxLine {
		t.Fatalf("read %d bytes, limit %d", flood.n, serialLimit(1024))
	}
}

type countingReader struct{ n int64 }

func (c *countingReader) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = "noise\n"[i%6]
	}
	c.n += int64(len(p))
	return len(p), nil
}

// The guest runs /job/cmd with sh: every argument must arrive exactly as sent.
func TestScriptQuotesEveryArgument(t *testing.T) {
	args := []string{"printf", `%s\n`, "plain", "it's", `"double"`, "$HOME", "`id`", "$(id)", "a\nb", `back\slash`, "", "*", "; rm -rf /"}
	out, err := guestShell(string(script(args))).Output()
	if err != nil {
		t.Fatal(err)
	}
	if want := strings.Join(args[2:], "\n") + "\n"; string(out) != want {
		t.Fatalf("sh saw\n%q\nwant\n%q", out, want)
	}
}

func FuzzScriptQuoting(f *testing.F) {
	for _, s := range []string{"", "'", "'\\''", "$(x)", "a b", "\n"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, arg string) {
		if strings.IndexByte(arg, 0) >= 0 {
			return // Validate refuses NUL bytes before anything is quoted
		}
		out, err := guestShell(string(script([]string{"printf", "%s", arg}))).Output()
		if err != nil {
			t.Fatal(err)
		}
		if string(out) != arg {
			t.Fatalf("sh saw %q, want %q", out, arg)
		}
	})
}

// guestShell runs a script with the guest's shell (busybox ash) when the host has it.
func guestShell(script string) *exec.Cmd {
	if bb, err := exec.LookPath("busybox"); err == nil {
		return exec.Command(bb, "sh", "-c", script)
	}
	return exec.Command("sh", "-c", script)
}
