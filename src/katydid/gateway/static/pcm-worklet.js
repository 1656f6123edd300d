// Katydid's browser page: the microphone's samples, 100 ms at a time, to the page's thread.
class PcmFrames extends AudioWorkletProcessor {
  constructor() {
    super();
    this.frame = new Float32Array(Math.round(sampleRate / 10));
    this.used = 0;
  }
  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (channel) {
      let i = 0;
      while (i < channel.length) {
        const n = Math.min(channel.length - i, this.frame.length - this.used);
        this.frame.set(channel.subarray(i, i + n), this.used);
        this.used += n;
        i += n;
        if (this.used === this.frame.length) {
          this.port.postMessage(this.frame.slice());
          this.used = 0;
        }
      }
    }
    return true;
  }
}
registerProcessor("pcm-frames", PcmFrames);
