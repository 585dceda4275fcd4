"""VQA v2 + Visual Genome QA dataset in the official format."""

from dataset.image_io import SkippingDataset, join_root, load_image, read_annotations, read_json_list
from dataset.text import pre_question

# Question word limit at test time: long questions are not cut when predicting.
TEST_MAX_QUESTION_WORDS = 50
VG_ANSWER_WEIGHT = 0.5


def answer_weights(answers) -> tuple:
    """Unique answers in first-appearance order and their vote shares (count / number of answers; /10 for VQA)."""
    weights = {}
    for answer in answers:
        weights[answer] = weights.get(answer, 0.0) + 1.0 / len(answers)
    return list(weights), list(weights.values())


class vqa_dataset(SkippingDataset):
    """VQA items: train -> (image, question, answers + eos, weights); test -> (image, question, question_id)."""

    def __init__(
        self,
        ann_file,
        transform,
        vqa_root,
        vg_root,
        eos="[SEP]",
        split="train",
        max_ques_words=30,
        answer_list="",
        skip_bad_images=False,
        raw_text=False,
    ):
        """Read the annotations; the test split also loads `answer_list` (a JSON list of answer strings)."""
        super().__init__(skip_bad_images)
        if split not in ("train", "test"):
            raise ValueError(f"vqa_dataset (dataset/vqa_dataset.py): split must be 'train' or 'test', got {split!r}")
        required = ("dataset", "image", "question") + (("answer",) if split == "train" else ("question_id",))
        self.ann = read_annotations(ann_file, required_keys=required)
        self.transform = transform
        self.roots = {"vqa": vqa_root, "vg": vg_root}
        self.eos = eos
        self.split = split
        self.max_ques_words = max_ques_words if split == "train" else TEST_MAX_QUESTION_WORDS
        self.answer_list = self._read_answer_list(answer_list) if split == "test" else []
        self.raw_text = bool(raw_text)  # VLMo.md 3.1: the question as written, no pre_question

    @staticmethod
    def _read_answer_list(answer_list) -> list:
        """Load the candidate answers ranked at test time."""
        if not answer_list:
            raise ValueError("vqa_dataset split='test' needs the answer list: set the config key `answer_list`")
        answers = read_json_list(answer_list)
        if not all(isinstance(answer, str) for answer in answers):
            raise ValueError(f"answer list '{answer_list}' must be a JSON list of strings")
        return answers

    def __len__(self) -> int:
        return len(self.ann)

    def _image_path(self, ann: dict, index: int) -> str:
        """Resolve the image under vqa_root or vg_root according to the item's `dataset` field."""
        if ann["dataset"] not in self.roots:
            raise ValueError(f"VQA item {index} has dataset {ann['dataset']!r}; expected 'vqa' or 'vg'")
        return join_root(self.roots[ann["dataset"]], ann["image"])

    def _answers(self, ann: dict) -> tuple:
        """Answers with eos appended and their weights: vote shares for vqa, a single 0.5 for vg."""
        if ann["dataset"] == "vg":
            answers, weights = [ann["answer"]], [VG_ANSWER_WEIGHT]
        else:
            answers, weights = answer_weights(ann["answer"])
        return [answer + self.eos for answer in answers], weights

    def load_item(self, index: int):
        """Return the train or test tuple of item `index`."""
        ann = self.ann[index]
        image = self.transform(load_image(self._image_path(ann, index), index))
        question = ann["question"] if self.raw_text else pre_question(ann["question"], self.max_ques_words)
        if self.split == "test":
            return image, question, ann["question_id"]
        answers, weights = self._answers(ann)
        return image, question, answers, weights
