package cli

import (
	"fmt"
	"io"
	"strings"

	"github.com/spf13/cobra"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/cli-runtime/pkg/printers"
	"sigs.k8s.io/controller-runtime/pkg/client/apiutil"
)

// output is the -o flag of the reading verbs: a table (wide adds columns), or the objects the
// table was made from, as JSON or YAML, exactly as kubectl get would print them.
type output struct{ format string }

func (f *output) add(cmd *cobra.Command) {
	cmd.Flags().StringVarP(&f.format, "output", "o", "", "output format: wide, json or yaml")
}

func (f *output) validate() error {
	switch f.format {
	case "", "wide", "json", "yaml":
		return nil
	}
	return fmt.Errorf("unknown output format %q: want wide, json or yaml", f.format)
}

func (f *output) wide() bool { return f.format == "wide" }

// structured tells whether to print objects instead of a table.
func (f *output) structured() bool { return f.format == "json" || f.format == "yaml" }

// print writes objs as one kubectl List in JSON or YAML.
func (f *output) print(w io.Writer, scheme *runtime.Scheme, objs ...runtime.Object) error {
	list := &unstructured.UnstructuredList{Object: map[string]any{"apiVersion": "v1", "kind": "List"}}
	for _, obj := range objs {
		gvk, err := apiutil.GVKForObject(obj, scheme)
		if err != nil {
			return err
		}
		m, err := runtime.DefaultUnstructuredConverter.ToUnstructured(obj)
		if err != nil {
			return err
		}
		u := unstructured.Unstructured{Object: m}
		u.SetGroupVersionKind(gvk)
		unstructured.RemoveNestedField(u.Object, "metadata", "managedFields")
		list.Items = append(list.Items, u)
	}
	var p printers.ResourcePrinter = &printers.JSONPrinter{}
	if f.format == "yaml" {
		p = &printers.YAMLPrinter{}
	}
	return p.PrintObj(list, w)
}

// color names a cell's color in a table.
type color int

const (
	plain color = iota
	good
	bad
	busy
)

// table writes aligned columns; with colors on, the cells of columns marked colored are
// wrapped in escape codes of one length, so the alignment holds.
type table struct {
	w       io.Writer
	tw      io.Writer
	flush   func() error
	colored map[int]bool
	paint   bool
}

func newTable(w io.Writer, paint bool, coloredColumns ...int) *table {
	tw := printers.GetNewTabWriter(w)
	t := &table{w: w, tw: tw, flush: tw.Flush, colored: map[int]bool{}, paint: paint}
	for _, c := range coloredColumns {
		t.colored[c] = true
	}
	return t
}

// cell is one value with its color.
type cell struct {
	text string
	c    color
}

func (t *table) row(cells ...cell) {
	out := make([]string, len(cells))
	for i, c := range cells {
		text := c.text
		if text == "" {
			text = "-"
		}
		if t.paint && t.colored[i] {
			code := map[color]string{plain: "39", good: "32", bad: "31", busy: "33"}[c.c]
			text = "\x1b[" + code + "m" + text + "\x1b[0m"
		}
		out[i] = text
	}
	fmt.Fprintln(t.tw, strings.Join(out, "\t"))
}

func (t *table) header(names ...string) {
	cells := make([]cell, len(names))
	for i, n := range names {
		cells[i] = cell{text: n}
	}
	t.row(cells...)
}

func p(s string) cell            { return cell{text: s} }
func c(s string, col color) cell { return cell{text: s, c: col} }

func yesNo(ok bool, known bool) cell {
	switch {
	case !known:
		return p("?")
	case ok:
		return c("yes", good)
	}
	return c("no", bad)
}
