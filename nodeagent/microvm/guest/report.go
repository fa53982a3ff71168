package guest

import (
	"bytes"
	"encoding/base64"
	"io"
	"strconv"
)

// Capture keeps the first Limit bytes written to it and counts, then drops, the rest: a
// stream is drained to its end whatever the command writes, and the guest holds at most Limit
// bytes of it.
type Capture struct {
	Limit int
	Kept  []byte
}

// Write keeps what fits under Limit and drops the rest.
func (c *Capture) Write(p []byte) (int, error) {
	if room := c.Limit - len(c.Kept); room > 0 {
		c.Kept = append(c.Kept, p[:min(room, len(p))]...)
	}
	return len(p), nil
}

// Drain reads r to its end into c.
func (c *Capture) Drain(r io.Reader) error {
	buf := make([]byte, 32<<10)
	_, err := io.CopyBuffer(c, r, buf)
	return err
}

// lineLen is how many base64 characters go on one line (as busybox's base64 writes them); the
// host reads lines of at most 4096 bytes.
const lineLen = 76

// Report is the frames for one run, as the host's parser reads them:
//
//	<nonce> out <n> / base64 lines / <nonce> err <n> / base64 lines / <nonce> exit <code> / <nonce> end
func Report(nonce string, stdout, stderr []byte, code int) []byte {
	var b bytes.Buffer
	section := func(word string, data []byte) {
		b.WriteString(nonce + " " + word + " " + strconv.Itoa(len(data)) + "\n")
		enc := make([]byte, base64.StdEncoding.EncodedLen(len(data)))
		base64.StdEncoding.Encode(enc, data)
		for len(enc) > 0 {
			n := min(lineLen, len(enc))
			b.Write(enc[:n])
			b.WriteByte('\n')
			enc = enc[n:]
		}
	}
	section("out", stdout)
	section("err", stderr)
	b.WriteString(nonce + " exit " + strconv.Itoa(code) + "\n")
	b.WriteString(nonce + " end\n")
	return b.Bytes()
}
