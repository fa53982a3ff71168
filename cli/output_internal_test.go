package cli

import (
	"bytes"
	"regexp"
	"strings"
	"testing"
)

// Painted cells keep the columns aligned: every cell of a colored column carries escape codes
// of one length, so the tab writer pads them all alike.
func TestPaintedTableStaysAligned(t *testing.T) {
	render := func(paint bool) string {
		var b bytes.Buffer
		tb := newTable(&b, paint, 1)
		tb.header("HOST", "ALIGNED", "PID")
		tb.row(p("edge-1"), yesNo(true, true), p("12"))
		tb.row(p("edge-22"), yesNo(false, true), p("3"))
		tb.row(p("e"), yesNo(false, false), p("456"))
		if err := tb.flush(); err != nil {
			t.Fatal(err)
		}
		return b.String()
	}
	plainText, painted := render(false), render(true)
	if strings.Contains(plainText, "\x1b[") {
		t.Fatalf("unpainted table has escapes:\n%q", plainText)
	}
	if !strings.Contains(painted, "\x1b[32myes\x1b[0m") || !strings.Contains(painted, "\x1b[31mno\x1b[0m") {
		t.Fatalf("painted table lacks colors:\n%q", painted)
	}
	stripped := regexp.MustCompile("\x1b\\[[0-9]+m").ReplaceAllString(painted, "")
	if stripped != plainText {
		t.Errorf("painting moved the columns:\n%s\nvs\n%s", stripped, plainText)
	}
}
