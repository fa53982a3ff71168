package guest_test

import (
	"bytes"
	"encoding/base64"
	"strings"
	"testing"

	"github.com/agent-gateway/gateway-operator/nodeagent/microvm"
	"github.com/agent-gateway/gateway-operator/nodeagent/microvm/guest"
)

const nonce = "0123456789abcdef0123456789abcdef"

// The init reads back exactly what the host's JobArchive wrote, the argv included.
func TestJobFromTheHostsArchive(t *testing.T) {
	argvs := [][]string{
		{"true"},
		{"sh", "-c", `echo "out:$1"; exit 7`, "sh", "it's", "a \"quoted\" $word"},
		{"printf", "%s\n", "", "'", "''", `\'`, "a b\tc\nd", "$(id)", "`id`", "\x01\xff"},
	}
	for _, argv := range argvs {
		stdin := []byte("from stdin\x00\n")
		archive, err := microvm.JobArchive(microvm.Request{Command: argv, Stdin: stdin}, nonce, 4096)
		if err != nil {
			t.Fatal(err)
		}
		files, err := guest.ParseArchive(archive)
		if err != nil {
			t.Fatalf("%q: %v", argv, err)
		}
		job, err := guest.NewJob(files)
		if err != nil {
			t.Fatalf("%q: %v", argv, err)
		}
		if job.Nonce != nonce || job.Cap != 4096 || !bytes.Equal(job.Stdin, stdin) {
			t.Errorf("%q: job %+v", argv, job)
		}
		got, ok := guest.Argv(job.Script)
		if !ok || strings.Join(got, "\x00") != strings.Join(argv, "\x00") {
			t.Errorf("argv %q (ok %v), want %q (script %q)", got, ok, argv, job.Script)
		}
	}
}

func TestArgvRefusesOtherScripts(t *testing.T) {
	for _, script := range []string{
		"", "exec\n", "exec 'a'", "echo 'a'\n", "exec a\n", "exec 'a\n", "exec 'a'b\n", "exec  'a'\n",
		"exec 'a' \n", "exec ''\n", "exec 'a'; 'rm'\n", "exec 'a'\n'b'\n",
	} {
		if argv, ok := guest.Argv([]byte(script)); ok {
			t.Errorf("Argv(%q) = %q, want refused", script, argv)
		}
	}
}

func TestParseJobLine(t *testing.T) {
	good := map[string]int{"job 1": 1, "job 1300": 1300, "job 4194304": guest.MaxJob}
	for line, want := range good {
		if n, err := guest.ParseJobLine([]byte(line)); err != nil || n != want {
			t.Errorf("%q: %d, %v; want %d", line, n, err, want)
		}
	}
	for _, line := range []string{"", "job", "job ", "job 0", "job -1", "job +5", "job 012", "job 4194305",
		"job 1 2", "jobs 1", "JOB 1", " job 1", "job 99999999999999999999"} {
		if n, err := guest.ParseJobLine([]byte(line)); err == nil {
			t.Errorf("%q: %d, want an error", line, n)
		}
	}
}

func TestNewJobChecksItsFiles(t *testing.T) {
	valid := func() map[string][]byte {
		return map[string][]byte{"job/cmd": []byte("exec 'true'\n"), "job/stdin": nil,
			"job/cap": []byte("10\n"), "job/nonce": []byte(nonce + "\n")}
	}
	if _, err := guest.NewJob(valid()); err != nil {
		t.Fatal(err)
	}
	bad := map[string]func(map[string][]byte){
		"no cmd":          func(f map[string][]byte) { delete(f, "job/cmd") },
		"no stdin":        func(f map[string][]byte) { delete(f, "job/stdin") },
		"no nonce":        func(f map[string][]byte) { delete(f, "job/nonce") },
		"empty nonce":     func(f map[string][]byte) { f["job/nonce"] = []byte("\n") },
		"nonce not hex":   func(f map[string][]byte) { f["job/nonce"] = []byte("abc def\n") },
		"nonce too long":  func(f map[string][]byte) { f["job/nonce"] = bytes.Repeat([]byte("a"), 129) },
		"cap negative":    func(f map[string][]byte) { f["job/cap"] = []byte("-1\n") },
		"cap signed":      func(f map[string][]byte) { f["job/cap"] = []byte("+1\n") },
		"cap not decimal": func(f map[string][]byte) { f["job/cap"] = []byte("0x10\n") },
		"cap huge":        func(f map[string][]byte) { f["job/cap"] = []byte("99999999999\n") },
	}
	for name, change := range bad {
		f := valid()
		change(f)
		if _, err := guest.NewJob(f); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestParseArchiveRefusesBrokenArchives(t *testing.T) {
	archive, err := microvm.JobArchive(microvm.Request{Command: []string{"true"}}, nonce, 10)
	if err != nil {
		t.Fatal(err)
	}
	// A second copy of job/cmd, whichever comes first, is refused.
	cmdAt := bytes.Index(archive, []byte("job/cmd\x00"))
	stdinAt := bytes.Index(archive, []byte("job/stdin\x00"))
	cmdEntry := archive[cmdAt-110 : stdinAt-110]
	dup := append(append(append([]byte{}, archive[:cmdAt-110]...), cmdEntry...), archive[cmdAt-110:]...)
	cases := map[string][]byte{
		"empty":          nil,
		"cut short":      archive[:len(archive)/2],
		"no trailer":     archive[:bytes.Index(archive, []byte("TRAILER!!!"))-110],
		"bad magic":      append([]byte("070707"), archive[6:]...),
		"bad hex":        append(append([]byte{}, archive[:6]...), append([]byte("zzzzzzzz"), archive[14:]...)...),
		"duplicate file": dup,
	}
	for name, b := range cases {
		if _, err := guest.ParseArchive(b); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// Entries other than the job's four files are ignored, and names are read cleaned.
func FuzzParseArchive(f *testing.F) {
	archive, err := microvm.JobArchive(microvm.Request{Command: []string{"echo", "hi"}, Stdin: []byte("x")}, nonce, 10)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(archive)
	f.Add([]byte("070701"))
	f.Fuzz(func(t *testing.T, b []byte) {
		files, err := guest.ParseArchive(b)
		if err != nil {
			return
		}
		for name, data := range files {
			if !strings.HasPrefix(name, "job/") || len(data) > len(b) {
				t.Fatalf("unexpected %q (%d bytes)", name, len(data))
			}
		}
	})
}

func TestCaptureKeepsLimitAndDrainsTheRest(t *testing.T) {
	c := &guest.Capture{Limit: 5}
	src := strings.NewReader(strings.Repeat("0123456789", 10000))
	if err := c.Drain(src); err != nil {
		t.Fatal(err)
	}
	if string(c.Kept) != "01234" || src.Len() != 0 {
		t.Errorf("kept %q with %d bytes unread", c.Kept, src.Len())
	}
}

func TestReportWrapsBase64As76CharacterLines(t *testing.T) {
	out := bytes.Repeat([]byte{0xff, 'a', '\n'}, 40) // 120 bytes: 160 base64 characters
	rep := string(guest.Report(nonce, out, nil, 3))
	enc := base64.StdEncoding.EncodeToString(out)
	want := nonce + " out 120\n" + enc[:76] + "\n" + enc[76:152] + "\n" + enc[152:] + "\n" +
		nonce + " err 0\n" + nonce + " exit 3\n" + nonce + " end\n"
	if rep != want {
		t.Errorf("report\n%s\nwant\n%s", rep, want)
	}
}
