fn main() {
    println!("oscore-gateway");
}
