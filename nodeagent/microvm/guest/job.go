// Package guest is the init of the tool-run microVM: the only program the guest runs as root.
// It takes one job (appended to the initramfs for a cold boot, or sent on the serial line to a
// warm guest after it said "gwvm ready"), runs the job's command as the unprivileged guest
// user, and reports the command's output in nonce-tagged frames on the serial line. The host's
// side of this protocol is nodeagent/microvm (JobArchive, readReport); hack/microvm-guest.sh
// builds cmd/gateway-guest-init into the guest's initramfs.
//
// The init starts no process but the command itself: every process start costs milliseconds
// under software emulation.
package guest

import (
	"bytes"
	"errors"
	"fmt"
	"path"
	"strconv"
	"strings"
)

// Bounds on what the init accepts from the host. The host's own limits are lower (a command of
// 64 KiB, 1 MiB of stdin); these keep a broken host from exhausting the guest's memory.
const (
	// MaxJob bounds the job archive a warm guest reads from its serial line.
	MaxJob = 4 << 20
	// maxJobLine bounds the "job <bytes>" line.
	maxJobLine = 32
	// maxNonce bounds the nonce, which starts every frame.
	maxNonce = 128
	// maxCap bounds the bytes kept per stream.
	maxCap = 64 << 20
)

// Job is what the host asks the guest to run.
type Job struct {
	// Script is /job/cmd: "exec" and the argv, each word single-quoted for sh.
	Script []byte
	// Stdin is fed to the command.
	Stdin []byte
	// Cap is how many bytes of each stream the host keeps; the guest keeps Cap+1 so that the
	// host can tell the stream was cut.
	Cap int
	// Nonce starts every frame; the command never sees it.
	Nonce string
}

// The job's files, relative to the guest's root.
const (
	fileCmd   = "job/cmd"
	fileStdin = "job/stdin"
	fileCap   = "job/cap"
	fileNonce = "job/nonce"
)

// ParseJobLine reads the "job <bytes>" line a warm guest gets before the job archive (without
// its line end) and returns the archive's size.
func ParseJobLine(line []byte) (int, error) {
	word, size, ok := bytes.Cut(line, []byte(" "))
	if !ok || string(word) != "job" {
		return 0, errors.New("not a job line")
	}
	n, err := strconv.Atoi(string(size))
	if err != nil || n <= 0 || n > MaxJob || size[0] == '+' || size[0] == '0' {
		return 0, fmt.Errorf("invalid job size %q", size)
	}
	return n, nil
}

// NewJob checks the job's files as read from the archive or the initramfs.
func NewJob(files map[string][]byte) (*Job, error) {
	for _, name := range []string{fileCmd, fileStdin, fileCap, fileNonce} {
		if _, ok := files[name]; !ok {
			return nil, fmt.Errorf("the job has no %s", name)
		}
	}
	nonce := strings.TrimSuffix(string(files[fileNonce]), "\n")
	if nonce == "" || len(nonce) > maxNonce || strings.Trim(nonce, "0123456789abcdefABCDEF") != "" {
		return nil, errors.New("the job's nonce is not hex")
	}
	capText := strings.TrimSuffix(string(files[fileCap]), "\n")
	c, err := strconv.Atoi(capText)
	if err != nil || c < 0 || c > maxCap || strings.Trim(capText, "0123456789") != "" {
		return nil, fmt.Errorf("the job's cap %q is invalid", capText)
	}
	return &Job{Script: files[fileCmd], Stdin: files[fileStdin], Cap: c, Nonce: nonce}, nil
}

// ParseArchive reads the job's files from a newc cpio archive (what the host's JobArchive
// writes). Entries other than the job's files are ignored; anything malformed is an error.
func ParseArchive(b []byte) (map[string][]byte, error) {
	const headerLen = 110
	files := map[string][]byte{}
	off := 0
	for {
		if len(b)-off < headerLen {
			return nil, errors.New("the job archive is cut short")
		}
		h := b[off : off+headerLen]
		if magic := string(h[:6]); magic != "070701" && magic != "070702" {
			return nil, errors.New("the job archive is not a newc cpio archive")
		}
		var fields [13]int
		for i := range fields {
			v, err := strconv.ParseUint(string(h[6+8*i:14+8*i]), 16, 32)
			if err != nil {
				return nil, errors.New("the job archive has an invalid header")
			}
			fields[i] = int(v)
		}
		mode, size, nameLen := fields[1], fields[6], fields[11]
		if nameLen < 1 {
			return nil, errors.New("the job archive has an invalid name")
		}
		nameStart := off + headerLen
		if nameLen > len(b)-nameStart || b[nameStart+nameLen-1] != 0 {
			return nil, errors.New("the job archive has an invalid name")
		}
		name := string(b[nameStart : nameStart+nameLen-1])
		dataStart := pad4(nameStart + nameLen)
		if dataStart > len(b) || size > len(b)-dataStart {
			return nil, errors.New("the job archive is cut short")
		}
		if name == "TRAILER!!!" {
			return files, nil
		}
		const typeMask, typeReg = 0o170000, 0o100000
		clean := strings.TrimPrefix(path.Clean("/"+name), "/")
		if mode&typeMask == typeReg && isJobFile(clean) {
			if _, dup := files[clean]; dup {
				return nil, fmt.Errorf("the job archive holds %s twice", clean)
			}
			files[clean] = b[dataStart : dataStart+size]
		}
		off = pad4(dataStart + size)
	}
}

func isJobFile(name string) bool {
	switch name {
	case fileCmd, fileStdin, fileCap, fileNonce:
		return true
	}
	return false
}

func pad4(n int) int { return (n + 3) &^ 3 }

// Argv reads the argv back from the job's script when it has exactly the form the host writes
// ("exec" and single-quoted words, see microvm's script), so that the init can exec the command
// itself instead of starting a shell to read the script. ok is false for any other script.
func Argv(script []byte) (argv []string, ok bool) {
	s, found := strings.CutPrefix(string(script), "exec")
	if !found {
		return nil, false
	}
	s, found = strings.CutSuffix(s, "\n")
	if !found {
		return nil, false
	}
	for s != "" {
		if s[0] != ' ' {
			return nil, false
		}
		s = s[1:]
		var word strings.Builder
		// One word: quoted runs and escaped quotes ('\'') up to the next space; at least one.
		if s == "" || s[0] == ' ' {
			return nil, false
		}
		for s != "" && s[0] != ' ' {
			switch {
			case s[0] == '\'':
				end := strings.IndexByte(s[1:], '\'')
				if end < 0 {
					return nil, false
				}
				word.WriteString(s[1 : 1+end])
				s = s[2+end:]
			case strings.HasPrefix(s, `\'`):
				word.WriteByte('\'')
				s = s[2:]
			default:
				return nil, false
			}
		}
		argv = append(argv, word.String())
	}
	if len(argv) == 0 || argv[0] == "" {
		return nil, false
	}
	return argv, true
}
