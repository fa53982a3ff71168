package microvm

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"strconv"
)

// maxLine bounds one serial line; longer lines are skipped (the guest's base64 lines are 76).
const maxLine = 4096

// guestReport is what the guest's /init framed on the serial line.
type guestReport struct {
	stdout, stderr       []byte
	stdoutLen, stderrLen int // the sizes the guest announced (capped at outputCap+1 by the guest)
	exitCode             int
}

// errSerialLimit means the guest wrote more than the host reads from it.
var errSerialLimit = errors.New("the guest wrote more to its serial line than allowed")

// serialLimit is how many bytes the host reads from a guest whose streams are capped at
// outputCap bytes each: both streams in base64 with line ends, plus room for boot messages.
func serialLimit(outputCap int) int64 {
	perStream := (int64(outputCap)+1+2)/3*4 + (int64(outputCap)/57+2)*2
	return 2*perStream + 256<<10
}

// readReport reads the guest's frames from r until the end frame. Only lines starting with the
// run's nonce are frames; everything else (kernel messages) is ignored, and nothing the guest
// writes makes the host read more than limit bytes or keep more than outputCap bytes a stream.
func readReport(r io.Reader, nonce string, outputCap int, limit int64) (*guestReport, error) {
	lr := &io.LimitedReader{R: r, N: limit}
	br := bufio.NewReaderSize(lr, maxLine)
	prefix := []byte(nonce + " ")
	rep := &guestReport{exitCode: -1}
	var section *[]byte
	var announced int
	gotExit := false
	for {
		line, err := readLine(br)
		if err != nil {
			if errors.Is(err, io.EOF) && lr.N <= 0 {
				return nil, errSerialLimit
			}
			return nil, fmt.Errorf("the guest ended without reporting: %w", err)
		}
		line = bytes.TrimRight(line, "\r\n")
		if !bytes.HasPrefix(line, prefix) {
			if section == nil {
				continue
			}
			chunk, derr := base64.StdEncoding.DecodeString(string(line))
			if derr != nil {
				continue // a kernel message between two base64 lines
			}
			if len(*section)+len(chunk) > announced {
				return nil, errors.New("the guest sent more output than it announced")
			}
			*section = append(*section, chunk...)
			continue
		}
		if err := closeSection(section, announced); err != nil {
			return nil, err
		}
		section = nil
		word, arg, _ := bytes.Cut(line[len(prefix):], []byte(" "))
		switch string(word) {
		case "out", "err":
			n, err := strconv.Atoi(string(arg))
			if err != nil || n < 0 || n > outputCap+1 {
				return nil, fmt.Errorf("the guest announced an invalid %s size %q", word, arg)
			}
			announced = n
			if string(word) == "out" {
				rep.stdoutLen, section = n, &rep.stdout
			} else {
				rep.stderrLen, section = n, &rep.stderr
			}
			*section = make([]byte, 0, min(n, outputCap+1))
		case "exit":
			code, err := strconv.Atoi(string(arg))
			if err != nil || code < 0 || code > 255 {
				return nil, fmt.Errorf("the guest reported an invalid exit code %q", arg)
			}
			rep.exitCode, gotExit = code, true
		case "end":
			if !gotExit {
				return nil, errors.New("the guest ended its report without an exit code")
			}
			return rep, nil
		default:
			return nil, fmt.Errorf("the guest sent an unknown frame %q", word)
		}
	}
}

func closeSection(section *[]byte, announced int) error {
	if section != nil && len(*section) != announced {
		return fmt.Errorf("the guest announced %d bytes of output and sent %d", announced, len(*section))
	}
	return nil
}

// readLine returns the next line, skipping any line longer than maxLine.
func readLine(br *bufio.Reader) ([]byte, error) {
	for {
		line, err := br.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			for errors.Is(err, bufio.ErrBufferFull) {
				_, err = br.ReadSlice('\n')
			}
			if err != nil {
				return nil, err
			}
			continue
		}
		if err != nil {
			return nil, err
		}
		return line, nil
	}
}

// result turns the guest's report into what the gateway gets: each stream cut to outputCap.
func (g *guestReport) result(outputCap int) Result {
	res := Result{ExitCode: g.exitCode, Phase: Succeeded}
	if g.exitCode != 0 {
		res.Phase = Failed
	}
	res.Stdout, res.StdoutTruncated = cut(g.stdout, outputCap)
	res.Stderr, res.StderrTruncated = cut(g.stderr, outputCap)
	return res
}

func cut(b []byte, n int) ([]byte, bool) {
	if len(b) > n {
		return b[:n], true
	}
	return b, false
}
