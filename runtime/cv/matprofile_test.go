//go:build matprofile

package cv_test

import (
	"testing"

	"gocv.io/x/gocv"

	"github.com/visionslice/visionslice/runtime/cv"
	"github.com/visionslice/visionslice/runtime/tensor"
)

// TestNoMatLeaks counts Mats with gocv's own profile (go test -tags matprofile).
func TestNoMatLeaks(t *testing.T) {
	before := gocv.MatProfile.Count()
	pp, err := cv.NewPreprocessor(cv.Params{Width: 32, Height: 32, Letterbox: true, Datatype: tensor.FP32, Scale: 1, Std: [3]float32{1, 1, 1}}, 2)
	if err != nil {
		t.Fatal(err)
	}
	good := encJPEG(t, gradient(64, 48), 90)
	for i := 0; i < 50; i++ {
		pp.Batch("x", [][]byte{good, good, []byte("junk"), good[:len(good)/2], hugePNG(1, 1)})
	}
	pp.Close()
	if after := gocv.MatProfile.Count(); after != before {
		t.Fatalf("%d Mats leaked", after-before)
	}
}
