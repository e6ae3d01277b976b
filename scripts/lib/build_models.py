"""Train, int8-quantise and write fogwhisk's own small models (run by scripts/build-models).

Generated data only: 96x96 RGB scenes with filled squares and discs on
noisy backgrounds (detectors), and pairs of grey 32x32 frames where
something moved or only the light changed (motion classifier). Each model
is written to agent/vision/catalog/<name>/ with manifest.toml, a golden input tensor
(golden/input.npy), its raw outputs from the TFLite interpreter
(golden/outputs.npz) and the true boxes of the golden scene.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import tempfile
from pathlib import Path

import numpy as np
import tensorflow as tf

SIZE = 96
GRID = 12  # stride 8
CLASSES = ("square", "disc")
SEED = 7


# ---------------------------------------------------------------- data
def scene(rng: np.random.Generator) -> tuple[np.ndarray, list[tuple[int, float, float, float, float]]]:
    """One 96x96 RGB uint8 scene and its objects (class, x0, y0, x1, y1 normalised)."""
    base = rng.integers(40, 200, size=3)
    img = np.clip(base + rng.normal(0, 12, (SIZE, SIZE, 3)), 0, 255).astype(np.float32)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    objs: list[tuple[int, float, float, float, float]] = []
    for _ in range(rng.integers(0, 4)):
        s = int(rng.integers(14, 40))
        x0, y0 = int(rng.integers(0, SIZE - s)), int(rng.integers(0, SIZE - s))
        cx, cy = x0 + s / 2, y0 + s / 2
        # keep one object per grid cell so each cell has one target
        if any(int(cx // 8) == int((o[1] + o[3]) * SIZE / 16) and
               int(cy // 8) == int((o[2] + o[4]) * SIZE / 16) for o in objs):
            continue
        colour = (base + rng.choice([-1, 1], 3) * rng.integers(60, 120, 3)) % 256
        cls = int(rng.integers(0, len(CLASSES)))
        if cls == 0:
            mask = (xx >= x0) & (xx < x0 + s) & (yy >= y0) & (yy < y0 + s)
        else:
            mask = (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= (s / 2) ** 2
        img[mask] = colour
        objs.append((cls, x0 / SIZE, y0 / SIZE, (x0 + s) / SIZE, (y0 + s) / SIZE))
    return np.clip(img, 0, 255).astype(np.uint8), objs


def scenes(n: int, seed: int) -> tuple[np.ndarray, list[list[tuple[int, float, float, float, float]]]]:
    rng = np.random.default_rng(seed)
    imgs, labels = [], []
    for _ in range(n):
        img, objs = scene(rng)
        imgs.append(img)
        labels.append(objs)
    return np.stack(imgs), labels


def backbone(x: tf.Tensor) -> tf.Tensor:
    x = tf.keras.layers.Rescaling(1 / 127.5, offset=-1)(x)
    for filters in (16, 32, 48):
        x = tf.keras.layers.Conv2D(filters, 3, strides=2, padding="same", activation="relu")(x)
        x = tf.keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
    return tf.keras.layers.Conv2D(64, 3, padding="same", activation="relu")(x)  # 12x12


def cell_targets(labels: list[list[tuple[int, float, float, float, float]]]) -> np.ndarray:
    """Per cell: mask, cx, cy, w, h (normalised), one-hot classes -> (n, 144, 5 + nc)."""
    t = np.zeros((len(labels), GRID * GRID, 5 + len(CLASSES)), np.float32)
    for i, objs in enumerate(labels):
        for cls, x0, y0, x1, y1 in objs:
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            cell = min(int(cy * GRID), GRID - 1) * GRID + min(int(cx * GRID), GRID - 1)
            t[i, cell, :5] = (1, cx, cy, x1 - x0, y1 - y0)
            t[i, cell, 5 + cls] = 1
    return t


def grid_centres() -> np.ndarray:
    ys, xs = np.meshgrid((np.arange(GRID) + 0.5) / GRID, (np.arange(GRID) + 0.5) / GRID,
                         indexing="ij")
    return np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float32)  # (144, 2) x, y


def representative(imgs: np.ndarray):  # type: ignore[no-untyped-def]
    def gen():  # type: ignore[no-untyped-def]
        for img in imgs[:200]:
            yield [img[None].astype(np.float32)]
    return gen


# ---------------------------------------------------------------- yolo
def train_yolo(imgs: np.ndarray, labels: list, epochs: int) -> tf.keras.Model:
    nc = len(CLASSES)
    inp = tf.keras.Input((SIZE, SIZE, 3), dtype=tf.float32)
    head = tf.keras.layers.Conv2D(4 + nc, 1)(backbone(inp))
    head = tf.keras.layers.Reshape((GRID * GRID, 4 + nc))(head)
    centres = tf.constant(grid_centres())

    def to_boxes(h: tf.Tensor) -> tf.Tensor:
        xy = centres[None] + (tf.sigmoid(h[..., :2]) - 0.5) * (2.0 / GRID)
        wh = tf.sigmoid(h[..., 2:4]) * 0.5
        return tf.concat([xy, wh, tf.sigmoid(h[..., 4:])], axis=-1)

    out = tf.keras.layers.Lambda(to_boxes)(head)
    model = tf.keras.Model(inp, out)

    def loss(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        mask = y_true[..., 0]
        box = tf.reduce_sum(tf.abs(y_true[..., 1:5] - y_pred[..., :4]), -1) * mask
        cls = tf.keras.losses.binary_crossentropy(y_true[..., 5:, None], y_pred[..., 4:, None])
        cls = tf.reduce_sum(cls * (1.0 + 4.0 * mask[..., None]), -1)
        return tf.reduce_mean(box * 5.0 + cls)

    model.compile(tf.keras.optimizers.Adam(2e-3), loss)
    model.fit(imgs.astype(np.float32), cell_targets(labels), batch_size=64, epochs=epochs,
              verbose=2)
    return model


def export_yolo(model: tf.keras.Model, imgs: np.ndarray) -> bytes:
    inp = tf.keras.Input((SIZE, SIZE, 3), batch_size=1, dtype=tf.float32)
    out = tf.keras.layers.Permute((2, 1))(model(inp))  # (1, 4 + nc, 144), Ultralytics' layout
    wrapped = tf.keras.Model(inp, out)
    conv = tf.lite.TFLiteConverter.from_keras_model(wrapped)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = representative(imgs)
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.uint8
    conv.inference_output_type = tf.int8
    return bytes(conv.convert())


# ---------------------------------------------------------------- ssd
ANCHOR = 0.25  # one square anchor per cell
SCALES = (10.0, 10.0, 5.0, 5.0)  # y, x, h, w


def ssd_targets(labels: list) -> np.ndarray:
    """Per anchor: mask, ty, tx, th, tw, then background + classes one-hot -> (n, 144, 6 + nc)."""
    nc = len(CLASSES)
    cells = cell_targets(labels)
    t = np.zeros((len(labels), GRID * GRID, 6 + nc), np.float32)
    c = grid_centres()
    mask = cells[..., 0]
    t[..., 0] = mask
    t[..., 1] = (cells[..., 2] - c[None, :, 1]) / ANCHOR * SCALES[0]
    t[..., 2] = (cells[..., 1] - c[None, :, 0]) / ANCHOR * SCALES[1]
    t[..., 3] = np.log(np.maximum(cells[..., 4], 1e-3) / ANCHOR) * SCALES[2]
    t[..., 4] = np.log(np.maximum(cells[..., 3], 1e-3) / ANCHOR) * SCALES[3]
    t[..., 1:5] *= mask[..., None]
    t[..., 5] = 1 - mask
    t[..., 6:] = cells[..., 5:]
    return t


def train_ssd(imgs: np.ndarray, labels: list, epochs: int) -> tf.keras.Model:
    nc = len(CLASSES)
    inp = tf.keras.Input((SIZE, SIZE, 3), dtype=tf.float32)
    feat = backbone(inp)
    enc = tf.keras.layers.Reshape((GRID * GRID, 4))(tf.keras.layers.Conv2D(4, 1)(feat))
    cls = tf.keras.layers.Reshape((GRID * GRID, nc + 1))(tf.keras.layers.Conv2D(nc + 1, 1)(feat))
    cls = tf.keras.layers.Activation("sigmoid")(cls)
    out = tf.keras.layers.Concatenate()([enc, cls])
    model = tf.keras.Model(inp, out)

    def loss(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        mask = y_true[..., 0]
        box = tf.reduce_sum(tf.abs(y_true[..., 1:5] - y_pred[..., :4]), -1) * mask
        ce = tf.keras.losses.binary_crossentropy(y_true[..., 5:, None], y_pred[..., 4:, None])
        ce = tf.reduce_sum(ce * (1.0 + 4.0 * mask[..., None]), -1)
        return tf.reduce_mean(box * 0.5 + ce)

    model.compile(tf.keras.optimizers.Adam(2e-3), loss)
    model.fit(imgs.astype(np.float32), ssd_targets(labels), batch_size=64, epochs=epochs,
              verbose=2)
    return model


def postprocess_signature(nc: int) -> str:
    attrs = [
        'name: "TFLite_Detection_PostProcess"',
        'attr { key: "max_detections" value { i: 10 } }',
        'attr { key: "max_classes_per_detection" value { i: 1 } }',
        'attr { key: "use_regular_nms" value { b: false } }',
        'attr { key: "nms_score_threshold" value { f: 0.300000 } }',
        'attr { key: "nms_iou_threshold" value { f: 0.500000 } }',
        f'attr {{ key: "y_scale" value {{ f: {SCALES[0]:f} }} }}',
        f'attr {{ key: "x_scale" value {{ f: {SCALES[1]:f} }} }}',
        f'attr {{ key: "h_scale" value {{ f: {SCALES[2]:f} }} }}',
        f'attr {{ key: "w_scale" value {{ f: {SCALES[3]:f} }} }}',
        f'attr {{ key: "num_classes" value {{ i: {nc} }} }}',
    ]
    return " ".join(attrs)


def export_ssd(model: tf.keras.Model, imgs: np.ndarray, workdir: Path) -> bytes:
    nc = len(CLASSES)
    c = grid_centres()
    anchors = np.stack([c[:, 1], c[:, 0], np.full(len(c), ANCHOR), np.full(len(c), ANCHOR)],
                       axis=1).astype(np.float32)  # y, x, h, w

    # Keras 3 variables survive as READ_VARIABLE ops the calibrator cannot run, and
    # freezing them inlines the post-processing stub: run the net on constants instead.
    convs = [(tf.constant(l.kernel.numpy()), tf.constant(l.bias.numpy()), l.strides[0])
             for l in model.layers if isinstance(l, tf.keras.layers.Conv2D)]

    def forward(image: tf.Tensor) -> tf.Tensor:
        x = image / 127.5 - 1.0
        for k, b, s in convs[:-2]:
            x = tf.nn.relu(tf.nn.conv2d(x, k, s, "SAME") + b)
        (ke, be, _), (kc, bc, _) = sorted(convs[-2:], key=lambda c: -int(c[0].shape[-1] == 4))
        enc = tf.reshape(tf.nn.conv2d(x, ke, 1, "SAME") + be, (1, GRID * GRID, 4))
        cls = tf.sigmoid(tf.reshape(tf.nn.conv2d(x, kc, 1, "SAME") + bc,
                                    (1, GRID * GRID, nc + 1)))
        return tf.concat([enc, cls], axis=-1)

    class Module(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = forward

        @tf.function(experimental_implements=postprocess_signature(nc))
        def _post(self, box_encodings, class_predictions, anchors):  # type: ignore[no-untyped-def]
            boxes = tf.constant(0.0, dtype=tf.float32, name="boxes")
            scores = tf.constant(0.0, dtype=tf.float32, name="scores")
            classes = tf.constant(0.0, dtype=tf.float32, name="classes")
            num = tf.constant(0.0, dtype=tf.float32, name="num_detections")
            return boxes, classes, scores, num

        @tf.function(input_signature=[tf.TensorSpec([1, SIZE, SIZE, 3], tf.float32, name="input")])
        def serve(self, image):  # type: ignore[no-untyped-def]
            out = self.model(image)
            enc = tf.identity(out[..., :4], name="box_encodings")
            cls = tf.identity(out[..., 4:], name="class_predictions")
            # tf.function reverses the outputs of an implements-function: undo it.
            return self._post(enc, cls, tf.constant(anchors))[::-1]

    del workdir
    module = Module()
    conv = tf.lite.TFLiteConverter.from_concrete_functions(
        [module.serve.get_concrete_function()], module)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = representative(imgs)
    conv.inference_input_type = tf.uint8
    conv.allow_custom_ops = True
    return bytes(conv.convert())


# ---------------------------------------------------------------- motion classifier
MSIZE = 32


def motion_pairs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two grey frames per sample (channels: before, after); label 1 when something moved."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, MSIZE, MSIZE, 2), np.uint8)
    y = np.zeros(n, np.int64)
    yy, xx = np.mgrid[0:MSIZE, 0:MSIZE]
    for i in range(n):
        bg = rng.integers(30, 200) + rng.normal(0, 10, (MSIZE, MSIZE))
        a, b = bg + rng.normal(0, 3, bg.shape), bg + rng.normal(0, 3, bg.shape)
        moved = rng.random() < 0.5
        if moved:
            s = rng.integers(5, 14)
            tone = rng.choice([-1, 1]) * rng.integers(40, 90)
            x0, y0 = rng.integers(0, MSIZE - s, 2)
            dx, dy = rng.integers(-6, 7, 2)
            a = np.where((xx >= x0) & (xx < x0 + s) & (yy >= y0) & (yy < y0 + s), a + tone, a)
            x1, y1 = np.clip(x0 + dx, 0, MSIZE - s), np.clip(y0 + dy, 0, MSIZE - s)
            if (x1, y1) == (x0, y0):
                x1 = (x0 + s) % (MSIZE - s)
            b = np.where((xx >= x1) & (xx < x1 + s) & (yy >= y1) & (yy < y1 + s), b + tone, b)
        elif rng.random() < 0.5:
            b = b * rng.uniform(0.6, 1.5)  # the light changed, nothing moved
        x[i, ..., 0] = np.clip(a, 0, 255)
        x[i, ..., 1] = np.clip(b, 0, 255)
        y[i] = int(moved)
    return x, y


def train_motion(x: np.ndarray, y: np.ndarray, epochs: int) -> tf.keras.Model:
    inp = tf.keras.Input((MSIZE, MSIZE, 2), dtype=tf.float32)
    h = tf.keras.layers.Rescaling(1 / 255.0)(inp)
    for filters in (8, 16, 32):
        h = tf.keras.layers.Conv2D(filters, 3, strides=2, padding="same", activation="relu")(h)
    h = tf.keras.layers.GlobalMaxPooling2D()(h)
    out = tf.keras.layers.Dense(2, activation="softmax")(h)
    model = tf.keras.Model(inp, out)
    model.compile(tf.keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(x.astype(np.float32), y, batch_size=64, epochs=epochs, verbose=2)
    return model


def export_plain(model: tf.keras.Model, samples: np.ndarray, batch_shape: tuple[int, ...]) -> bytes:
    inp = tf.keras.Input(batch_shape[1:], batch_size=1, dtype=tf.float32)
    wrapped = tf.keras.Model(inp, model(inp))
    conv = tf.lite.TFLiteConverter.from_keras_model(wrapped)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = representative(samples)
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.uint8
    conv.inference_output_type = tf.int8
    return bytes(conv.convert())


# ---------------------------------------------------------------- writing
def run_tflite(blob: bytes, x: np.ndarray) -> list[np.ndarray]:
    interp = tf.lite.Interpreter(model_content=blob)
    interp.allocate_tensors()
    interp.set_tensor(interp.get_input_details()[0]["index"], x)
    interp.invoke()
    return [interp.get_tensor(d["index"]) for d in interp.get_output_details()]


def toml_list(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in values) + "]"


def write(out: Path, name: str, blob: bytes, golden_x: np.ndarray, header: str, body: str,
          golden_objs: list[tuple[int, float, float, float, float]] | None,
          labels: tuple[str, ...]) -> None:
    d = out / name
    if d.exists():
        shutil.rmtree(d)
    (d / "golden").mkdir(parents=True)
    fname = f"{name}.tflite"
    (d / fname).write_bytes(blob)
    np.save(d / "golden" / "input.npy", golden_x)
    outputs = run_tflite(blob, golden_x)
    np.savez(d / "golden" / "outputs.npz", *outputs)
    sha = hashlib.sha256(blob).hexdigest()
    quoted = ", ".join(f'"{lbl}"' for lbl in labels)
    text = (f"{header}\nname = \"{name}\"\nversion = 1\nfile = \"{fname}\"\nsha256 = \"{sha}\"\n"
            f"source = \"scripts/build-models (generated data)\"\nlicense = \"Apache-2.0\"\n"
            f"labels = [{quoted}]\n{body}\n"
            "[[golden]]\ninput = \"golden/input.npy\"\noutputs = \"golden/outputs.npz\"\n"
            "atol = 0.0\n")
    for cls, x0, y0, x1, y1 in golden_objs or []:
        text += (f"\n[[golden.detections]]\nlabel = \"{labels[cls]}\"\n"
                 f"box = {toml_list([x0, y0, x1, y1])}\nscore = 0.75\nscore_tol = 0.25\n"
                 "box_tol = 0.08\n")
    (d / "manifest.toml").write_text(text)
    print(f"build-models: wrote {d} ({len(blob)} bytes, sha256 {sha})")


def golden_scene() -> tuple[np.ndarray, list[tuple[int, float, float, float, float]]]:
    rng = np.random.default_rng(1234)
    while True:
        img, objs = scene(rng)
        if len(objs) >= 2:
            return img, objs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--samples", type=int, default=3000)
    ap.add_argument("names", nargs="*", default=["shapes-yolo", "motion-cls", "shapes-ssd"])
    args = ap.parse_args()
    tf.random.set_seed(SEED)
    tf.config.threading.set_intra_op_parallelism_threads(2)
    imgs, labels = scenes(args.samples, SEED)
    gimg, gobjs = golden_scene()
    input_block = ('[input]\nsize = [96, 96]\ndtype = "uint8"\ncolor = "rgb"\n'
                   'resize = "stretch"\n')
    for name in args.names:
        if name == "shapes-yolo":
            blob = export_yolo(train_yolo(imgs, labels, args.epochs), imgs)
            body = ("min_score = 0.5\nnms_iou = 0.45\nmax_detections = 10\n\n" + input_block +
                    '\n[decoder]\nkind = "yolov8"\n\n[decoder.params]\ncoords = "normalized"\n')
            write(args.out, name, blob, gimg[None],
                  "# Own model: squares and discs, YOLOv8-style raw head [1, 6, 144], int8.",
                  body, gobjs, CLASSES)
        elif name == "shapes-ssd":
            with tempfile.TemporaryDirectory() as tmp:
                blob = export_ssd(train_ssd(imgs, labels, args.epochs), imgs, Path(tmp))
            body = ("min_score = 0.5\nnms_iou = 0.5\nmax_detections = 10\n\n" + input_block +
                    '\n[decoder]\nkind = "ssd_postprocess"\n')
            write(args.out, name, blob, gimg[None],
                  "# Own model: squares and discs, SSD head + TFLite_Detection_PostProcess.",
                  body, gobjs, CLASSES)
        elif name == "motion-cls":
            x, y = motion_pairs(args.samples, SEED)
            blob = export_plain(train_motion(x, y, args.epochs), x, (1, MSIZE, MSIZE, 2))
            gx, gy = motion_pairs(2, 99)
            k = int(np.argmax(gy)) if gy.any() else 0
            body = ('min_score = 0.5\n\n[input]\nsize = [32, 32]\ndtype = "uint8"\n'
                    'color = "gray"\nresize = "stretch"\n\n[decoder]\nkind = "classify"\n\n'
                    '[decoder.params]\nactivation = "none"\n')
            write(args.out, name, blob, gx[k:k + 1],
                  "# Own model: two grey 32x32 frames (before, after) -> still | motion, int8.",
                  body, None, ("still", "motion"))
            print(f"build-models: motion-cls golden sample is {'motion' if gy[k] else 'still'}")
        else:
            raise SystemExit(f"build-models: unknown model {name!r}")


if __name__ == "__main__":
    main()
