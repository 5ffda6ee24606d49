from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Sampling(_message.Message):
    __slots__ = ("temperature", "top_p", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class Rendering(_message.Message):
    __slots__ = ("steps", "guidance", "seed")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    steps: int
    guidance: float
    seed: int
    def __init__(self, steps: _Optional[int] = ..., guidance: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class Segment(_message.Message):
    __slots__ = ("caption", "caption_ids", "written", "image")
    CAPTION_FIELD_NUMBER: _ClassVar[int]
    CAPTION_IDS_FIELD_NUMBER: _ClassVar[int]
    WRITTEN_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    caption: str
    caption_ids: _containers.RepeatedScalarFieldContainer[int]
    written: bool
    image: bytes
    def __init__(self, caption: _Optional[str] = ..., caption_ids: _Optional[_Iterable[int]] = ..., written: _Optional[bool] = ..., image: _Optional[bytes] = ...) -> None: ...

class StoryRequest(_message.Message):
    __slots__ = ("caption", "start_image", "segments", "sampling", "rendering", "story_so_far", "caption_ids")
    CAPTION_FIELD_NUMBER: _ClassVar[int]
    START_IMAGE_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    RENDERING_FIELD_NUMBER: _ClassVar[int]
    STORY_SO_FAR_FIELD_NUMBER: _ClassVar[int]
    CAPTION_IDS_FIELD_NUMBER: _ClassVar[int]
    caption: str
    start_image: bytes
    segments: int
    sampling: Sampling
    rendering: Rendering
    story_so_far: _containers.RepeatedCompositeFieldContainer[Segment]
    caption_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, caption: _Optional[str] = ..., start_image: _Optional[bytes] = ..., segments: _Optional[int] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., rendering: _Optional[_Union[Rendering, _Mapping]] = ..., story_so_far: _Optional[_Iterable[_Union[Segment, _Mapping]]] = ..., caption_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class CaptionEvent(_message.Message):
    __slots__ = ("index", "caption", "caption_ids", "written_at")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    CAPTION_FIELD_NUMBER: _ClassVar[int]
    CAPTION_IDS_FIELD_NUMBER: _ClassVar[int]
    WRITTEN_AT_FIELD_NUMBER: _ClassVar[int]
    index: int
    caption: str
    caption_ids: _containers.RepeatedScalarFieldContainer[int]
    written_at: float
    def __init__(self, index: _Optional[int] = ..., caption: _Optional[str] = ..., caption_ids: _Optional[_Iterable[int]] = ..., written_at: _Optional[float] = ...) -> None: ...

class ImageEvent(_message.Message):
    __slots__ = ("index", "png", "width", "height", "features_at", "render_start", "render_end", "features", "feature_rows", "feature_dim")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    FEATURES_AT_FIELD_NUMBER: _ClassVar[int]
    RENDER_START_FIELD_NUMBER: _ClassVar[int]
    RENDER_END_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    FEATURE_ROWS_FIELD_NUMBER: _ClassVar[int]
    FEATURE_DIM_FIELD_NUMBER: _ClassVar[int]
    index: int
    png: bytes
    width: int
    height: int
    features_at: float
    render_start: float
    render_end: float
    features: bytes
    feature_rows: int
    feature_dim: int
    def __init__(self, index: _Optional[int] = ..., png: _Optional[bytes] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., features_at: _Optional[float] = ..., render_start: _Optional[float] = ..., render_end: _Optional[float] = ..., features: _Optional[bytes] = ..., feature_rows: _Optional[int] = ..., feature_dim: _Optional[int] = ...) -> None: ...

class StoryStats(_message.Message):
    __slots__ = ("prompt_tokens", "output_tokens", "peak_kv_blocks", "kv_block_bytes", "tokenize_s", "mllm_s", "render_s", "total_s", "tokens_per_s", "resumes")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PEAK_KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCK_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOKENIZE_S_FIELD_NUMBER: _ClassVar[int]
    MLLM_S_FIELD_NUMBER: _ClassVar[int]
    RENDER_S_FIELD_NUMBER: _ClassVar[int]
    TOTAL_S_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    RESUMES_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    output_tokens: int
    peak_kv_blocks: int
    kv_block_bytes: int
    tokenize_s: float
    mllm_s: float
    render_s: float
    total_s: float
    tokens_per_s: float
    resumes: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., peak_kv_blocks: _Optional[int] = ..., kv_block_bytes: _Optional[int] = ..., tokenize_s: _Optional[float] = ..., mllm_s: _Optional[float] = ..., render_s: _Optional[float] = ..., total_s: _Optional[float] = ..., tokens_per_s: _Optional[float] = ..., resumes: _Optional[int] = ...) -> None: ...

class StoryEvent(_message.Message):
    __slots__ = ("story_id", "sent_at", "caption", "image", "done")
    STORY_ID_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_FIELD_NUMBER: _ClassVar[int]
    CAPTION_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    story_id: str
    sent_at: float
    caption: CaptionEvent
    image: ImageEvent
    done: StoryStats
    def __init__(self, story_id: _Optional[str] = ..., sent_at: _Optional[float] = ..., caption: _Optional[_Union[CaptionEvent, _Mapping]] = ..., image: _Optional[_Union[ImageEvent, _Mapping]] = ..., done: _Optional[_Union[StoryStats, _Mapping]] = ...) -> None: ...
