package repo

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

// Apply creates every object of a multi-document YAML file of the repository (rel, relative to
// its root) with c, so that a test runs exactly what is shipped.
func Apply(ctx context.Context, c client.Client, rel string) error {
	path, err := Path(rel)
	if err != nil {
		return err
	}
	f, err := os.Open(path) //nolint:gosec // a file of this repository, named by the test
	if err != nil {
		return err
	}
	defer f.Close()
	dec := utilyaml.NewYAMLOrJSONDecoder(f, 4096)
	for {
		var doc map[string]any
		if err := dec.Decode(&doc); errors.Is(err, io.EOF) {
			return nil
		} else if err != nil {
			return fmt.Errorf("%s: %w", rel, err)
		}
		if len(doc) == 0 {
			continue
		}
		obj := &unstructured.Unstructured{Object: doc}
		if err := c.Create(ctx, obj); err != nil {
			return fmt.Errorf("%s: create %s %s: %w", rel, obj.GetKind(), obj.GetName(), err)
		}
	}
}
